"""The jobs API (`/v1/jobs`, `/v1/queue`): submit, watch, cancel; works for every task and model."""

from sdserver.api.jobs.routes import router

__all__ = ["router"]
