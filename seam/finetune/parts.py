"""The pieces of a model split fine-tuning trains, in PyTorch: LoRA adapters attached to a span of decoder layers
with a seeded initialisation that does not depend on which side holds them, and ``Part``, a run of layers with
the embedding before it or the head after it, so that the UE's part and the edge's part chained compute exactly
what the whole model computes.

The base model runs in eval mode: its dropout would draw from each side's random stream in a different order
than the whole model does, and LoRA fine-tuning of a frozen base gains little from it.
"""

from __future__ import annotations

import copy
import zlib

import torch
from torch import nn

from seam.export.families import FamilyAdapter
from seam.export.segment import Prelude
from seam.runtime.errors import SeamError
from seam.runtime.spans import Span

IGNORE_INDEX = -100  # labels not scored (padding), as transformers counts them


def load_base(artifact):
    """The model ``artifact`` was exported from, in fp32, checked to be the very weights of the export."""
    from seam.export.sources import fingerprint, load_model

    loaded = load_model(artifact.manifest.source)
    if fingerprint(loaded.model) != artifact.manifest.fingerprint:
        raise SeamError(f"the weights of {artifact.manifest.source!r} differ from those {artifact.root} was exported "
                        "from; export it again or train from the same model")
    loaded.model.requires_grad_(False)
    return loaded


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers: a job attaches adapters to and drops
    layers from its own modules, while the frozen base weights stay in memory once however many jobs train."""
    shared = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo=shared)


def attach_lora(model: nn.Module, family: FamilyAdapter, layers: Span, rank: int, alpha: float, seed: int):
    """``model`` with LoRA adapters on the family's attention projections in ``layers`` (a peft model)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise SeamError(f"the LoRA rank must be at least 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(family.lora_targets),
                        layers_to_transform=list(layers), fan_in_fan_out=family.name == "gpt2")
    peft_model = get_peft_model(model, config)
    seed_lora(peft_model, seed)
    return peft_model


def adapter_key(name: str) -> str:
    """A LoRA parameter's name without the wrappers peft puts around the model."""
    return name.removeprefix("base_model.model.")


def seed_lora(peft_model: nn.Module, seed: int) -> None:
    """Initialises every LoRA A matrix from a generator seeded by the run's seed and the matrix's own name (B
    stays zero, as peft starts it), so that the UE's, the edge's and a whole model's adapters start alike."""
    for name, parameter in peft_model.named_parameters():
        if ".lora_A." in name:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(adapter_key(name).encode()))
            bound = 1 / parameter.shape[1] ** 0.5
            with torch.no_grad():
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 * bound - bound)


def trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


class Part(nn.Module):
    """Layers ``span`` of ``family``'s model, from token ids (``embed``) or hidden states, to hidden states or,
    with ``head``, logits. Padding goes on the right; positions count from 0."""

    def __init__(self, family: FamilyAdapter, span: Span, embed: bool, head: bool):
        super().__init__()
        self.family, self.span, self.embed, self.head = family, span, embed, head
        self.prelude = Prelude(family, torch.float32)

    def forward(self, first: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = attention_mask.shape
        positions = torch.arange(length).expand(batch, length)
        hidden = self.family.embed(first, positions) if self.embed else first
        bias, *features = self.prelude(attention_mask, positions)
        layers = self.family.layers()
        for index in self.span:
            hidden = self.family.run_layer(layers[index], hidden, bias, tuple(features), None)
        if self.head:
            return self.family.lm_head()(self.family.final_norm()(hidden))
        return hidden


def keep_only(family: FamilyAdapter, span: Span, embed: bool, head: bool) -> None:
    """Frees what a side of a split never runs: the decoder layers outside ``span``, and the embedding or the head
    unless its part has them (a weight the two share lives on through the one kept)."""
    layers = family.layers()
    for index in range(len(layers)):
        if index not in span:
            layers[index] = nn.Identity()
    if not embed:
        family.model.set_input_embeddings(nn.Identity())
    if not head:
        family.model.set_output_embeddings(nn.Identity())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's prediction of the next label, skipping ``IGNORE_INDEX``."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
