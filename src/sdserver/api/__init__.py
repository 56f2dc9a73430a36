"""HTTP adapters: one package per protocol, each a thin layer over the service."""
