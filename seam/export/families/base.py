"""Family adapters: what Seam needs to know about one architecture, registered by decorator.

An adapter names the embedding, decoder layers, final norm and LM head of a loaded ``*ForCausalLM`` model, its
KV layout, how to build its position features, and how to call one decoder layer with an explicit cache. Code
that touches transformers internals lives in the family's own module, which declares the transformers versions
it was written against. Adding a family is one small module.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import transformers
from packaging.specifiers import SpecifierSet
from torch import nn

from seam.runtime.errors import SeamError

_BY_MODEL_TYPE: dict[str, type[FamilyAdapter]] = {}


class FamilyAdapter:
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    transformers_versions: ClassVar[str]
    # Names of the prelude outputs, besides the attention bias, that every block of this family takes.
    position_features: ClassVar[tuple[str, ...]] = ()
    # The linear modules inside a decoder layer that LoRA adapts when fine-tuning (peft target names).
    lora_targets: ClassVar[tuple[str, ...]] = ()
    # The KV layouts its blocks can be exported in (``seam.export.attention``): "shared-buffer" needs the
    # family's attention to go through transformers' attention interface with rotary applied before it.
    kv_layouts: ClassVar[tuple[str, ...]] = ("concat",)

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_config()

    def check_config(self) -> None:
        """Refuses configurations the adapter cannot export faithfully."""

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def lm_head(self) -> nn.Module:
        raise NotImplementedError

    def num_kv_heads(self) -> int:
        raise NotImplementedError

    def head_dim(self) -> int:
        raise NotImplementedError

    def attention_window(self) -> int | None:
        """Sliding-window length when every layer attends only to that many recent positions."""
        return None

    def position_tensors(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Tensors named by ``position_features``, each [B, S, ...]."""
        return ()

    def run_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,  # [B, S, H]
        attention_bias: torch.Tensor,  # [B, 1, S, past + S]
        features: tuple[torch.Tensor, ...],
        cache,
        **attention,  # passed through to the attention implementation (see ``seam.export.attention``)
    ) -> torch.Tensor:
        raise NotImplementedError


def register_family(adapter: type[FamilyAdapter]) -> type[FamilyAdapter]:
    for model_type in adapter.model_types:
        if model_type in _BY_MODEL_TYPE:
            raise ValueError(
                f"model_type {model_type!r} is registered twice: by {_BY_MODEL_TYPE[model_type].name} "
                f"and by {adapter.name}"
            )
    for model_type in adapter.model_types:
        _BY_MODEL_TYPE[model_type] = adapter
    return adapter


def registered_families() -> dict[str, type[FamilyAdapter]]:
    """Family name to adapter class."""
    return {adapter.name: adapter for adapter in _BY_MODEL_TYPE.values()}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def _supported_list() -> str:
    return "; ".join(
        f"{name} ({', '.join(adapter.model_types)})" for name, adapter in sorted(registered_families().items())
    )


def family_for(config) -> type[FamilyAdapter]:
    """The adapter for a transformers config; refuses unknown families and models without a causal LM head."""
    model_type = getattr(config, "model_type", None)
    adapter = _BY_MODEL_TYPE.get(model_type)
    if adapter is None:
        raise SeamError(
            f"model_type {model_type!r} is not a supported decoder LLM family; supported: {_supported_list()}"
        )
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise SeamError(
            f"the model is a {', '.join(architectures)}, not a causal language model; Seam splits "
            f"*ForCausalLM models of these families: {_supported_list()}"
        )
    if transformers.__version__ not in SpecifierSet(adapter.transformers_versions):
        raise SeamError(
            f"the {adapter.name} family adapter supports transformers {adapter.transformers_versions}, "
            f"but {transformers.__version__} is installed; install the pinned 'export' extra"
        )
    return adapter


def layer_output(output) -> torch.Tensor:
    """Decoder layers return a tensor in transformers 5 and a tuple in 4.x."""
    return output[0] if isinstance(output, tuple) else output
