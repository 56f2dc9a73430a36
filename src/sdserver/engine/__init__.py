"""The only package that imports torch and diffusers.

`Engine` is the narrow interface the service layer uses: `prepare` checks and completes a request
against the loaded model, `run` executes one batch of compatible requests in one pipeline call.
"""

from sdserver.engine.engine import Engine

__all__ = ["Engine"]
