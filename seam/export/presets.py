"""Built-in models: configs with seeded random weights, saved with ``save_pretrained`` and loaded like any model.

Presets exist so that tests, benchmarks and the demo run offline through the same ``from_pretrained`` path a
real checkpoint takes. They are built once into ``$SEAM_HOME/presets`` (default ``~/.cache/seam``). A preset
with a training spec is trained on the grammar corpus when built instead, so its perplexity means something.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from seam.export.byte_tokenizer import SPECIAL_TOKENS, build_byte_tokenizer
from seam.export.training import VERSION as TRAINING_VERSION
from seam.export.training import TrainingSpec, held_out_perplexity, train_model
from seam.runtime.files import seam_home, staging_directory

_TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=512,
    # A wide init gives peaked logits, so greedy tokens are not decided by float noise between near-ties.
    initializer_range=0.2,
)


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str
    purpose: str
    config: dict = field(default_factory=dict)
    seed: int = 0
    training: TrainingSpec | None = None

    @property
    def spec_hash(self) -> str:
        parts = [self.model_type, self.config, self.seed, "byte-tokenizer-v1"]
        if self.training:  # appended only when set, so the random-weight presets keep their directories
            parts += [asdict(self.training), TRAINING_VERSION]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


PRESETS = {
    preset.name: preset
    for preset in [
        Preset("tiny-llama", "llama", "tests: 4 layers, hidden 64", dict(_TINY_LLAMA)),
        Preset("tiny-qwen2", "qwen2", "tests: 4 layers, hidden 64, qkv bias", dict(_TINY_LLAMA)),
        Preset("tiny-qwen3", "qwen3", "tests: 4 layers, hidden 64, q/k norms", dict(_TINY_LLAMA, head_dim=16)),
        Preset(
            "tiny-mistral",
            "mistral",
            "tests: 4 layers, hidden 64, sliding window 8",
            dict(_TINY_LLAMA, sliding_window=8),
        ),
        Preset(
            "tiny-gpt2",
            "gpt2",
            "tests: 4 layers, hidden 64",
            dict(n_embd=64, n_layer=4, n_head=4, vocab_size=320, n_positions=512, initializer_range=0.2),
        ),
        Preset(
            "small-llama",
            "llama",
            "benchmarks: ~110M parameters, 12 layers, hidden 768",
            dict(
                hidden_size=768,
                intermediate_size=1536,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=4,
                vocab_size=32000,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
            ),
        ),
        Preset(
            "trained-llama",
            "llama",
            "perplexity analyses and readable text: 6 layers, hidden 128, trained on the grammar corpus (~3 min)",
            dict(
                hidden_size=128,
                intermediate_size=384,
                num_hidden_layers=6,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=320,
                max_position_embeddings=512,
            ),
            # Trained at the full context, so that positions up to 512 have been seen.
            training=TrainingSpec(steps=250, sequence=512, batch=8, learning_rate=4e-3),
        ),
        Preset(
            "tiny-trained-llama",
            "llama",
            "tests: 4 layers, hidden 64, trained on the grammar corpus in seconds",
            dict(_TINY_LLAMA, initializer_range=0.02),  # trained logits are peaked anyway; a wide init slows learning
            training=TrainingSpec(steps=60, sequence=64, batch=8, learning_rate=1e-2, corpus_sentences=2000),
        ),
    ]
}
DEFAULT_PRESET = "smollm2-135m-instruct"  # a packaged real model (seam.export.packaged)


def preset_dir(name: str) -> Path:
    return seam_home() / "presets" / f"{name}-{PRESETS[name].spec_hash}"


def _train_into(directory: Path, name: str, config, byte_tokenizer) -> None:
    """Trains the preset's model, saves it, and records its held-out perplexity beside it in ``training.json``."""
    preset = PRESETS[name]
    model = train_model(config, preset.training, preset.seed, byte_tokenizer, name)
    model.save_pretrained(directory)
    report = {**asdict(preset.training), "version": TRAINING_VERSION,
              "held_out_perplexity": held_out_perplexity(model, preset.training, byte_tokenizer)}
    (directory / "training.json").write_text(json.dumps(report, indent=2) + "\n")


def ensure_preset(name: str) -> Path:
    """The preset's model directory, building it on first use (written aside, then renamed into place)."""
    target = preset_dir(name)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    preset = PRESETS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_directory(target)
    try:
        pad, bos, eos = range(len(SPECIAL_TOKENS))
        config = AutoConfig.for_model(
            preset.model_type, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, **preset.config
        )
        config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
        byte_tokenizer = build_byte_tokenizer(config.vocab_size, preset.seed)
        if preset.training:
            _train_into(staging, name, config, byte_tokenizer)
        else:
            torch.manual_seed(preset.seed)
            AutoModelForCausalLM.from_config(config).save_pretrained(staging)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=byte_tokenizer,
            pad_token=SPECIAL_TOKENS[pad],
            bos_token=SPECIAL_TOKENS[bos],
            eos_token=SPECIAL_TOKENS[eos],
        )
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another process did not win the race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
