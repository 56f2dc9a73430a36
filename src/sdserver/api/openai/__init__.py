"""The OpenAI Images API dialect (`/v1/images/*`, `/v1/models`)."""

from sdserver.api.openai.routes import router

__all__ = ["router"]
