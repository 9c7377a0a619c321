"""Seam: run a large language model split between a user device and an edge GPU server."""

__version__ = "0.1.0"
