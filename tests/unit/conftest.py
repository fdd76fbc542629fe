"""The app and test client of the API unit tests; each module supplies its own `runtime`."""

import pytest

from ortserve.api import create_app
from ortserve.config import Settings


@pytest.fixture
def app(library, runtime):
    app = create_app(Settings(models=library.root), runtime=runtime)
    app.testing = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()
