"""The studio: a single-page app at `/` that drives the jobs API (its files ship in `static/`)."""

from sdserver.api.studio.routes import CSP, install

__all__ = ["CSP", "install"]
