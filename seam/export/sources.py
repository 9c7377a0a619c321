"""Model sources: a preset name, a packaged real model, a GGUF file, a local model directory, or a Hugging Face hub
id (offline from its cache).

Every source goes through ``from_pretrained``, a GGUF checkpoint through its ``gguf_file`` path; presets are
simply directories built on first use.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from seam.export.families import FamilyAdapter, family_for
from seam.export.packaged import PACKAGED, packaged_file
from seam.export.presets import PRESETS, ensure_preset
from seam.runtime.errors import SeamError


@dataclass
class LoadedModel:
    source: str
    model: object  # a transformers *ForCausalLM in eval mode, fp32
    tokenizer: object
    family: FamilyAdapter


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    # peft asks transformers a question transformers 5 has renamed, and the warning says nothing to a user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass(frozen=True)
class Location:
    """What ``from_pretrained`` reads: a directory or hub id, and the GGUF file in that directory, if any."""

    path: str
    gguf_file: str | None = None

    @property
    def options(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _quiet_gguf_conversion() -> None:
    """transformers draws its GGUF conversion bar with a tqdm of its own that its progress-bar switch does not
    reach; Seam's commands draw their own bars."""
    from transformers import modeling_gguf_pytorch_utils

    if not isinstance(modeling_gguf_pytorch_utils.tqdm, functools.partial):
        modeling_gguf_pytorch_utils.tqdm = functools.partial(modeling_gguf_pytorch_utils.tqdm, disable=True)


def resolve(source: str) -> Location:
    """Where ``source`` is: a preset (built on first use), a packaged model's GGUF file, a GGUF file, a model
    directory (with a config.json, or with one GGUF file), or a hub id."""
    if source in PRESETS:
        return Location(str(ensure_preset(source)))
    if source in PACKAGED:
        return _gguf(packaged_file(source))
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SeamError(f"{source} is a file but no GGUF checkpoint; give a .gguf file or a model directory")
        return _gguf(path)
    if path.exists():
        if (path / "config.json").is_file():
            return Location(str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf(ggufs[0])
        found = f"{len(ggufs)} GGUF files; name one with --gguf-file" if ggufs else "no config.json and no GGUF file"
        raise SeamError(f"{source} holds {found}; point at a Hugging Face model directory or a GGUF file")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # hub ids are "org/name"
        raise SeamError(f"model directory {source} does not exist; give a preset ('seam models'), a directory or a hub id")
    close = difflib.get_close_matches(source, [*PRESETS, *PACKAGED], n=1, cutoff=0.8)
    if close:  # said at once: a typo of a preset is no hub id worth a network round
        raise SeamError(f"{source!r} is no preset, directory or hub id; did you mean {close[0]!r}? ('seam models' "
                        "lists the presets)")
    return Location(source)


def _gguf(path: Path) -> Location:
    return Location(str(path.parent), path.name)


def gguf_sha256(source: str) -> str | None:
    """The sha256 of the GGUF file ``source`` loads from, or None when it loads from something else."""
    location = resolve(source)
    if not location.gguf_file:
        return None
    digest = hashlib.sha256()
    with open(Path(location.path) / location.gguf_file, "rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(source: str) -> LoadedModel:
    """Loads a causal LM for export in fp32 with eager attention, refusing unsupported families early; a GGUF
    checkpoint is dequantized to fp32 by transformers."""
    # An unreachable hub fails in seconds, not after the client's default waits and retries; set before the hub
    # client is first imported, which reads them once.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    _quiet_transformers()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location = resolve(source)
    if location.gguf_file:
        _quiet_gguf_conversion()
    try:
        config = AutoConfig.from_pretrained(location.path, **location.options)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if location.gguf_file:
            raise SeamError(f"cannot read the GGUF checkpoint {source!r}: {first_line}") from None
        raise SeamError(
            f"cannot load model {source!r}: not a preset, not a local directory, and not available from the hub "
            f"or its local cache ({first_line}); run 'seam models' for the presets"
        ) from None
    adapter = family_for(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(location.path, dtype=torch.float32, attn_implementation="eager",
                                                     **location.options)
        tokenizer = AutoTokenizer.from_pretrained(location.path, **location.options)
    except (OSError, ValueError) as error:
        raise SeamError(f"cannot load model {source!r}: {str(error).strip().splitlines()[0]}") from None
    model.eval()
    return LoadedModel(source=source, model=model, tokenizer=tokenizer, family=adapter(model))


def fingerprint(model) -> str:
    """sha256 over the config and every weight's name, dtype, shape and bytes."""
    import torch

    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "_attn_implementation", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merge_adapter(loaded: LoadedModel, adapter: Path) -> str:
    """Merges a peft LoRA adapter (``ue_client DIR train --out``) into ``loaded``'s weights; returns the sha256 of
    the adapter's weights, which the export records."""
    from peft import PeftModel  # the finetune extra: a missing one is named by the CLI

    weights = adapter / "adapter_model.safetensors"
    if not (adapter / "adapter_config.json").is_file() or not weights.is_file():
        raise SeamError(f"--adapter {adapter} holds no peft adapter (adapter_config.json and "
                        "adapter_model.safetensors); give the directory 'ue_client DIR train --out' wrote")
    try:
        merged = PeftModel.from_pretrained(loaded.model, adapter).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SeamError(f"cannot merge --adapter {adapter} into {loaded.source!r}: {first_line}") from None
    merged.eval()
    loaded.model, loaded.family = merged, type(loaded.family)(merged)
    return hashlib.sha256(weights.read_bytes()).hexdigest()
