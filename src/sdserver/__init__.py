"""sdserver: a local Stable Diffusion inference server."""

__version__ = "0.1.0"
