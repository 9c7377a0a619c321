"""The family registry: every registered model type has a tiny model, and bad families are refused clearly."""

import pytest
from transformers import AutoConfig

from seam.export.families.base import FamilyAdapter, family_for, register_family, supported_model_types
from seam.export.presets import PRESETS
from seam.runtime.errors import SeamError


def test_every_registered_model_type_has_a_tiny_preset():
    tiny_types = {preset.model_type for name, preset in PRESETS.items() if name.startswith("tiny-")}
    missing = set(supported_model_types()) - tiny_types
    assert not missing, f"registered model types without a tiny test model: {sorted(missing)}"


def test_duplicate_registration_raises():
    class Again(FamilyAdapter):
        name = "again"
        model_types = ("llama",)
        transformers_versions = ">=5"

    with pytest.raises(ValueError, match="registered twice"):
        register_family(Again)


def test_unknown_family_lists_supported_ones():
    with pytest.raises(SeamError) as error:
        family_for(AutoConfig.for_model("bert"))
    message = str(error.value)
    assert "'bert'" in message and "llama (llama, mistral, qwen2, qwen3)" in message and "gpt2" in message


def test_non_causal_head_is_refused():
    config = AutoConfig.for_model("llama", architectures=["LlamaForSequenceClassification"])
    with pytest.raises(SeamError, match="not a causal language model"):
        family_for(config)
