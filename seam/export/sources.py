"""Model sources: a preset name, a local model directory, or a Hugging Face hub id (offline from its cache).

Every source goes through ``from_pretrained``; presets are simply directories built on first use.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from seam.export.families import FamilyAdapter, family_for
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


def resolve(source: str) -> str:
    """The path or hub id ``from_pretrained`` should read for ``source``."""
    if source in PRESETS:
        return str(ensure_preset(source))
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SeamError(f"{source} is a path but holds no config.json; point at a Hugging Face model directory")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # hub ids are "org/name"
        raise SeamError(f"model directory {source} does not exist; give a preset ('seam models'), a directory or a hub id")
    close = difflib.get_close_matches(source, PRESETS, n=1, cutoff=0.8)
    if close:  # said at once: a typo of a preset is no hub id worth a network round
        raise SeamError(f"{source!r} is no preset, directory or hub id; did you mean {close[0]!r}? ('seam models' "
                        "lists the presets)")
    return source


def load_model(source: str) -> LoadedModel:
    """Loads a causal LM for export in fp32 with eager attention, refusing unsupported families early."""
    # An unreachable hub fails in seconds, not after the client's default waits and retries; set before the hub
    # client is first imported, which reads them once.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    _quiet_transformers()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location = resolve(source)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SeamError(
            f"cannot load model {source!r}: not a preset, not a local directory, and not available from the hub "
            f"or its local cache ({first_line}); run 'seam models' for the presets"
        ) from None
    adapter = family_for(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(location)
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
