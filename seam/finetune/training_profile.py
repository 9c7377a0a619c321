"""Measuring what fine-tuning costs on this device, for ``seam profile --training``: each block's layers and the
head, with LoRA on every layer as a pipeline stage trains them, timed for a forward and a backward in PyTorch at
each micro-batch and sequence length asked for. The placement of a training pipeline reads these timings instead
of scaling the onnxruntime prefill, which prices PyTorch's training of a layer several times too low or too high
depending on the device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from seam.finetune.parts import IGNORE_INDEX, Part, attach_lora, causal_lm_loss, load_base
from seam.planning.schema import Timing, p90
from seam.runtime.spans import Span

LORA_RANK, LORA_ALPHA = 8, 16.0  # the pipeline's defaults: the adapters' cost barely depends on them


def _timed(run: Callable[[], None], repeats: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), p90(samples)


def measure_training(artifact, threads: int, shapes: list[tuple[int, int]], repeats: int,
                     warmup: int) -> tuple[dict[tuple[int, int], list[Timing]], list[Timing]]:
    """Each block's timings by its layers, and the head's, for every (micro-batch, sequence) of ``shapes``."""
    torch.set_num_threads(threads)
    base = load_base(artifact)
    num_layers, hidden = artifact.num_layers, artifact.manifest.dims.hidden_size
    model = attach_lora(base.model, base.family, Span(0, num_layers), LORA_RANK, LORA_ALPHA, seed=0)
    generator = torch.Generator().manual_seed(0)
    blocks: dict[tuple[int, int], list[Timing]] = {}
    head_timings: list[Timing] = []
    parts = [((block.layers.start, block.layers.end), Part(base.family, block.layers, False, False))
             for block in artifact.manifest.blocks]
    head = Part(base.family, Span(num_layers, num_layers), embed=False, head=True)
    for micro_batch, sequence in shapes:
        mask = torch.ones((micro_batch, sequence), dtype=torch.int64)
        labels = torch.randint(0, artifact.manifest.dims.vocab_size, (micro_batch, sequence), generator=generator)
        labels[:, :1] = IGNORE_INDEX

        def stage(part: Part) -> Callable[[], None]:
            def run() -> None:  # a middle stage: hidden states in, their gradient back out
                first = torch.randn((micro_batch, sequence, hidden), generator=generator, requires_grad=True)
                out = part(first, mask)
                out.backward(torch.ones_like(out))
            return run

        def score() -> None:
            first = torch.randn((micro_batch, sequence, hidden), generator=generator, requires_grad=True)
            causal_lm_loss(head(first, mask), labels).backward()

        for span, part in parts:
            blocks.setdefault(span, []).append(Timing(micro_batch, sequence, *_timed(stage(part), repeats, warmup)))
        head_timings.append(Timing(micro_batch, sequence, *_timed(score, repeats, warmup)))
        model.zero_grad(set_to_none=True)
    return blocks, head_timings
