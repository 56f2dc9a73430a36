"""The studio: a single-page app at `/` that drives the jobs API (its files ship in `static/`)."""

from sdserver.api.studio.routes import install

__all__ = ["install"]
