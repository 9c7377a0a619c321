"""Adapters out of a split run: the UE's layers [0, cut) and the edge's [cut, L) written together as one peft
adapter of the whole model, which ``PeftModel.from_pretrained`` loads and ``seam export --adapter`` merges."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from seam.finetune.parts import adapter_key, attach_lora, load_base
from seam.runtime.errors import SeamError
from seam.runtime.files import write_directory_atomically
from seam.runtime.protocol import AdapterWeights
from seam.runtime.spans import Span


def split_weights(weights) -> dict[str, np.ndarray]:
    """The named arrays a message with ``names``, ``shapes`` and flat ``data`` packs (``AdapterWeights``,
    ``UploadAdapter``, ``RoundAverage``)."""
    if not all(isinstance(name, str) for name in weights.names) or not all(
            isinstance(shape, list) and all(type(size) is int and size >= 0 for size in shape)
            for shape in weights.shapes):
        raise SeamError("adapter weights need string names and shapes of non-negative integers")
    sizes = [int(np.prod(shape)) for shape in weights.shapes]
    if (weights.data is None or weights.data.dtype != np.float32 or len(weights.names) != len(weights.shapes)
            or len(set(weights.names)) != len(weights.names) or sum(sizes) != weights.data.size):
        raise SeamError("the adapter weights do not add up to their names and shapes")
    chunks = np.split(weights.data, np.cumsum(sizes)[:-1])
    return {name: chunk.reshape(shape) for name, shape, chunk in zip(weights.names, weights.shapes, chunks)}


def save_adapter(artifact, out: Path, parts: list[dict[str, np.ndarray]], rank: int, alpha: float, seed: int,
                 extra: Callable[[Path], object] = lambda directory: None) -> Path:
    """Writes ``parts`` (LoRA weights by ``adapter_key`` name, each layer's from exactly one part) as one peft
    adapter over every layer, and whatever ``extra`` writes beside it: into a temporary sibling directory, renamed
    over ``out`` at the end."""
    base = load_base(artifact)
    model = attach_lora(base.model, base.family, Span(0, len(base.family.layers())), rank, alpha, seed)
    slots = {adapter_key(name): parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    filled: set[str] = set()
    for part in parts:
        for name, values in part.items():
            if name not in slots or name in filled or tuple(values.shape) != tuple(slots[name].shape):
                raise SeamError(f"adapter weight {name} {list(values.shape)} fits no slot of the whole model's adapter")
            with torch.no_grad():
                slots[name].copy_(torch.from_numpy(np.asarray(values, np.float32)))
            filled.add(name)
    if missing := set(slots) - filled:
        raise SeamError(f"the split run left {len(missing)} adapter weights untrained, e.g. {sorted(missing)[0]}")

    # Named as the user named the model at export (a preset, a hub id or a directory), not by the cache path it
    # was loaded from, and as a causal LM's adapter, so that peft's auto classes know what to load it onto.
    config = model.peft_config["default"]
    config.base_model_name_or_path, config.task_type = artifact.manifest.source, "CAUSAL_LM"

    def write(staging: Path) -> None:
        model.save_pretrained(staging, save_embedding_layers=False)  # adapters on attention only: no vocabulary check
        extra(staging)

    return write_directory_atomically(out, write)


def trained_weights(peft_model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The trainable LoRA weights of ``peft_model`` by ``adapter_key`` name."""
    return {adapter_key(name): parameter.detach().numpy().copy()
            for name, parameter in peft_model.named_parameters() if parameter.requires_grad}


def pack_weights(session_id: str, named: dict[str, np.ndarray]) -> AdapterWeights:
    """Named arrays as one message (``split_weights`` unpacks it)."""
    data = np.concatenate([values.reshape(-1) for values in named.values()]).astype(np.float32)
    return AdapterWeights(session_id, list(named), [list(values.shape) for values in named.values()], data)


MOMENTS = ("exp_avg", "exp_avg_sq")  # what AdamW keeps per parameter besides its step count


def training_state(peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """The adapters and the optimizer's moments and step count, by name: what resuming a run needs."""
    state = trained_weights(peft_model)
    slots = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    steps = 0.0
    for name, parameter in zip(list(state), slots):
        moments = optimizer.state.get(parameter)
        if moments:
            steps = float(moments["step"])
            for moment in MOMENTS:
                state[f"{name}:{moment}"] = moments[moment].detach().numpy().copy()
    state["optimizer:step"] = np.array([steps], np.float32)
    return state


def restore_training_state(peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           state: dict[str, np.ndarray]) -> None:
    """Puts ``training_state``'s adapters and moments back; refuses a state of other layers or ranks."""
    named = [(adapter_key(name), parameter) for name, parameter in peft_model.named_parameters()
             if parameter.requires_grad]
    steps = float(np.asarray(state.get("optimizer:step", [np.nan])).reshape(-1)[0])
    moments_expected = steps > 0
    expected = {name for name, _ in named} | {"optimizer:step"}
    if moments_expected:
        expected |= {f"{name}:{moment}" for name, _ in named for moment in MOMENTS}
    if set(state) != expected or not np.isfinite(steps):
        raise SeamError("the checkpoint's adapters do not match this run's layers, rank or optimizer; resume with the "
                        "settings it was written with")
    saved = optimizer.state_dict()
    with torch.no_grad():
        for index, (name, parameter) in enumerate(named):
            if tuple(state[name].shape) != tuple(parameter.shape):
                raise SeamError(f"checkpoint weight {name} has shape {list(state[name].shape)}, this run "
                                f"{list(parameter.shape)}")
            parameter.copy_(torch.from_numpy(np.asarray(state[name], np.float32)))
            if moments_expected and any(state[f"{name}:{moment}"].shape != state[name].shape for moment in MOMENTS):
                raise SeamError(f"the checkpoint's optimizer moments of {name} do not match its weight")
            if moments_expected:
                saved["state"][index] = {"step": torch.tensor(steps), **{
                    moment: torch.from_numpy(np.asarray(state[f"{name}:{moment}"], np.float32).copy())
                    for moment in MOMENTS}}
    optimizer.load_state_dict(saved)
