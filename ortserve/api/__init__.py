"""HTTP: the only code that imports flask. `gunicorn 'ortserve.api:create_app()'`."""

from ortserve.api.app import create_app, init_app

__all__ = ["create_app", "init_app"]
