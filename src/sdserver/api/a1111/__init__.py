"""The AUTOMATIC1111 web UI API dialect (`/sdapi/v1/*`)."""

from sdserver.api.a1111.routes import render_error, router

__all__ = ["render_error", "router"]
