"""Checks an exported artifact against the PyTorch model it came from, at every cut.

For each cut the UE's blocks and the edge's blocks run chained in onnxruntime, teacher-forced with the PyTorch
greedy tokens: a prefill and 16 decode steps, for batch 1 and a left-padded batch of 2. In fp32 the greedy
tokens must be identical and the logits within 1e-4. fp16 exports and int8 UE blocks are compared with the
fp32 PyTorch model by top-1 agreement and KL divergence, and the tolerance used is recorded with the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.generation import LocalSplit, generate, left_pad, positions_from_mask
from seam.runtime.shell import bar_disabled

DECODE_STEPS = 16
FP32_TOLERANCE = 1e-4
# Reduced precision changes tokens on near-ties; these bounds flag a broken graph, not ordinary rounding.
LOSSY_MIN_TOP1 = 0.9
LOSSY_MAX_KL = 0.05
PROMPT_TEXT = "Seam runs the first layers on the device and streams hidden states to the edge server."


@dataclass
class Reference:
    """PyTorch greedy run of one prompt batch."""

    prompts: list[list[int]]
    tokens: np.ndarray  # [B, steps + 1]
    logits: np.ndarray  # [steps + 1, B, V] float32, logits of the last position at each step


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def reference_prompts(tokenizer, vocab_size: int) -> list[list[list[int]]]:
    """A batch of one prompt and a left-padded batch of two prompts of different lengths."""
    ids = [i for i in tokenizer(PROMPT_TEXT)["input_ids"] if i < vocab_size] or list(range(1, 8))
    ids = (ids * 8)[:12]
    return [[ids[:7]], [ids[:7], ids[5:9]]]


def reference_run(model, prompts: list[list[int]], pad_id: int, steps: int = DECODE_STEPS) -> Reference:
    import torch
    from transformers import DynamicCache

    ids, mask = left_pad(prompts, pad_id)
    positions = positions_from_mask(mask)
    cache = DynamicCache(config=model.config)
    tokens, logits = [], []
    with torch.no_grad():
        step_ids = ids
        for step in range(steps + 1):
            out = model(
                input_ids=torch.from_numpy(step_ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions),
                past_key_values=cache,
                use_cache=True,
            )
            last = out.logits[:, -1, :].float().numpy()
            logits.append(last)
            tokens.append(last.argmax(axis=-1))
            step_ids = tokens[-1][:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
    return Reference(prompts=prompts, tokens=np.stack(tokens, axis=1), logits=np.stack(logits))


def _run_split(pool: SessionPool, cut: int, ue_variant: str, reference: Reference, pad_id: int) -> np.ndarray:
    split = LocalSplit(pool, cut, ue_variant=ue_variant)
    forced = lambda logits, step: reference.tokens[:, step]  # noqa: E731
    steps = reference.tokens.shape[1]
    return np.stack([logits for _, logits in generate(split, reference.prompts, steps, pad_id, forced)])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(reference: Reference, logits: np.ndarray) -> dict:
    top1 = logits.argmax(axis=-1).T == reference.tokens  # [B, steps + 1]
    ref_log, got_log = _log_softmax(reference.logits.astype(np.float64)), _log_softmax(logits.astype(np.float64))
    kl = (np.exp(ref_log) * (ref_log - got_log)).sum(axis=-1)
    return {
        "greedy_match": bool(top1.all()),
        "max_abs_diff": float(np.abs(logits - reference.logits).max()),
        "top1_agreement": float(top1.mean()),
        "kl_divergence": float(kl.mean()),
    }


def validate_cut(pool: SessionPool, cut: int, ue_variant: str, references: list[Reference], pad_id: int) -> dict:
    """One record of the manifest's ``validation`` list."""
    results = [compare(ref, _run_split(pool, cut, ue_variant, ref, pad_id)) for ref in references]
    artifact = pool.artifact
    record = {
        "cut": cut,
        "dtype": ue_variant if ue_variant == artifact.manifest.dtype else f"{ue_variant}-ue",
        "batches": [len(ref.prompts) for ref in references],
        "decode_steps": references[0].tokens.shape[1] - 1,
        "greedy_match": all(r["greedy_match"] for r in results),
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "top1_agreement": min(r["top1_agreement"] for r in results),
        "kl_divergence": max(r["kl_divergence"] for r in results),
    }
    if record["dtype"] == "fp32":
        record["tolerance"] = f"identical greedy tokens, max_abs_diff <= {FP32_TOLERANCE:g}"
        record["passed"] = record["greedy_match"] and record["max_abs_diff"] <= FP32_TOLERANCE
    else:
        record["tolerance"] = f"top1_agreement >= {LOSSY_MIN_TOP1:g}, kl_divergence <= {LOSSY_MAX_KL:g} (vs fp32)"
        record["passed"] = record["top1_agreement"] >= LOSSY_MIN_TOP1 and record["kl_divergence"] <= LOSSY_MAX_KL
    return record


def locate_mismatch(pool: SessionPool, model, prompts: list[list[int]], pad_id: int) -> str:
    """Names the first block whose prefill output departs from PyTorch by more than the fp32 tolerance."""
    import torch

    ids, mask = left_pad(prompts, pad_id)
    positions = positions_from_mask(mask)
    with torch.no_grad():
        hidden = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            output_hidden_states=True,
        ).hidden_states
    artifact = pool.artifact
    output = ids
    for block in artifact.manifest.blocks:
        runner = pool.runner(block.layers)
        runner.reset(len(prompts))
        output = runner.run(output, mask, positions)
        if block.layers.end == artifact.num_layers:
            return f"block {block.index} (layers {block.layers}), output 'logits'"
        expected = hidden[block.layers.end].float().numpy()
        real = mask.astype(bool)  # padded positions carry no meaning
        diff = float(np.abs(output - expected)[real].max())
        if diff > FP32_TOLERANCE * max(1.0, float(np.abs(expected).max())):
            return f"block {block.index} (layers {block.layers}), output 'hidden_out' (max abs diff {diff:.3g})"
    raise AssertionError("unreachable: the last block ends at the last layer")


def references_for(model, tokenizer) -> list[Reference]:
    """PyTorch greedy runs of the validation prompts; take them in fp32, before any cast."""
    pad_id = pad_token_id(tokenizer)
    return [reference_run(model, prompts, pad_id) for prompts in reference_prompts(tokenizer, model.config.vocab_size)]


def validate(artifact: Artifact, references: list[Reference], pad_id: int, quiet: bool = False) -> list[dict]:
    """One record per (cut, variant): every cut with the export dtype, and with int8 UE blocks when present."""
    manifest = artifact.manifest
    cuts = manifest.cuts or [artifact.num_layers]
    variants = list(manifest.blocks[0].variants)
    pool = SessionPool(artifact)
    records = []
    with tqdm(total=len(cuts) * len(variants), desc="validate", unit="cut", disable=bar_disabled(quiet), leave=False) as bar:
        for variant in variants:
            for cut in cuts:
                records.append(validate_cut(pool, cut, variant, references, pad_id))
                bar.update(1)
    return records


class ParityError(SeamError):
    """fp32 blocks disagree with PyTorch: a bug in export, not in the user's input."""

    exit_code = 1


def require_fp32_parity(records: list[dict], artifact: Artifact, model, references: list[Reference], pad_id: int):
    failed = [r for r in records if r["dtype"] == "fp32" and not r["passed"]]
    if failed:
        where = locate_mismatch(SessionPool(artifact), model, references[-1].prompts, pad_id)
        worst = max(failed, key=lambda r: r["max_abs_diff"])
        raise ParityError(
            f"fp32 parity failed at cuts {[r['cut'] for r in failed]}: first divergence in {where}; "
            f"logits max abs diff {worst['max_abs_diff']:.3g} (tolerance {FP32_TOLERANCE:g}), "
            f"greedy tokens {'match' if worst['greedy_match'] else 'differ'}"
        )
