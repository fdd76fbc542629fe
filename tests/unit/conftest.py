"""The app and test client of the API unit tests (each module supplies its own `runtime`),
and the `base` model that create builds on. Shared fakes and helpers: tests/support/."""

import pytest

from ortserve.api import create_app
from ortserve.config import Settings
from tests.support.bundles import add_base


@pytest.fixture
def app(library, runtime):
    app = create_app(Settings(models=library.root), runtime=runtime)
    app.testing = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def base(library, tmp_path):
    """`base:latest`: an int4 bundle with its own parameters, system prompt and messages."""
    return add_base(library, tmp_path)
