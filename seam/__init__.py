"""Seam: run a large language model split between a user device and an edge GPU server.

Each room is a subpackage (see ARCHITECTURE.md); the modules here are the umbrella ``seam`` command and its
demo and key commands, which may use every room and which no room imports.
"""

from seam.runtime.version import VERSION as __version__  # noqa: F401
