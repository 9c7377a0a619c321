"""Registry of supported model families; importing this package registers every built-in family."""

from seam.export.families.base import FamilyAdapter, family_for, registered_families
from seam.export.families import gpt2, llama  # noqa: F401  (registration side effect)

__all__ = ["FamilyAdapter", "family_for", "registered_families"]
