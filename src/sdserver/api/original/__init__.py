"""The original Stable Diffusion API Server's API (the Photoshop plugin's dialect)."""

from sdserver.api.original.routes import router

__all__ = ["router"]
