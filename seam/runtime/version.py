"""Seam's distribution name and version, for install hints and for what an artifact records it was made by."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "seam-llm"

try:
    VERSION = version(DISTRIBUTION)
except PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"
