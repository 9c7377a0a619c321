"""Pipeline-parallel split fine-tuning over several nodes, on ``torch.distributed.pipelining``: the UE (rank 0)
holds the embedding and the first span of layers, each edge node the next span, and the last node the head and
the loss (edge-loss), or the UE holds the head and the loss too (u-shaped: the last node's hidden states come
back to it); micro-batches flow through a GPipe or 1F1B schedule, and every stage trains the LoRA adapters of its
own layers and no others. No process keeps a layer outside its span. Raw text stays on the UE: the edges see
hidden states, and in edge-loss mode the last node the labels it scores.

Every node runs the same command with its own ``--rank``; rank 0 hosts the rendezvous. Stages talk over gloo, each
collective bounded by ``--timeout``. The adapters are seeded by name (``parts.seed_lora``), so that a pipeline and
one process training the whole model start alike, and with the same micro-batching they take the same steps.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import torch
from torch import nn

from seam.finetune.adapters import restore_training_state, trained_weights, training_state
from seam.finetune.data import Batch
from seam.finetune.parts import IGNORE_INDEX, Part, attach_lora, causal_lm_loss, keep_only, load_base, trainable
from seam.runtime.errors import SeamError
from seam.runtime.spans import Span

SCHEDULES = ("gpipe", "1f1b")
MODES = ("edge-loss", "u-shaped")


@dataclass(frozen=True)
class PipelineJob:
    """What every node of a run must agree on."""

    cuts: tuple[int, ...]  # the layers where one stage ends and the next begins
    num_layers: int
    schedule: str = "1f1b"
    microbatches: int = 4
    batch: int = 8
    seq_len: int = 64
    steps: int = 10
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    mode: str = "edge-loss"

    def __post_init__(self):
        bounds = (0, *self.cuts, self.num_layers)
        if not self.cuts or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise SeamError(f"--stages {','.join(map(str, self.cuts))}: the cuts must rise strictly between 0 and "
                            f"{self.num_layers}, so that every stage holds a layer")
        if self.mode not in MODES:
            raise SeamError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.schedule not in SCHEDULES:
            raise SeamError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.microbatches < 1 or self.batch % self.microbatches:
            raise SeamError(f"--batch {self.batch} must split into --microbatches {self.microbatches} equal parts")
        if self.schedule == "1f1b" and self.microbatches < self.stages:
            raise SeamError(f"--schedule 1f1b keeps every stage busy with one micro-batch each: give --microbatches "
                            f"{self.stages} or more (or --schedule gpipe)")

    @property
    def spans(self) -> list[Span]:
        bounds = (0, *self.cuts, self.num_layers)
        return [Span(a, b) for a, b in zip(bounds, bounds[1:])]

    @property
    def stages(self) -> int:
        """The nodes, one rank each."""
        return len(self.cuts) + 1

    @property
    def pipeline_stages(self) -> int:
        """The stages a micro-batch passes: one per node, and in u-shaped mode the head, back on the UE."""
        return self.stages + (self.mode == "u-shaped")

    @property
    def scorer(self) -> int:
        """The rank that holds the labels and computes the loss."""
        return 0 if self.mode == "u-shaped" else self.stages - 1

    def fingerprint(self) -> int:
        """A number every node computes alike from the settings, compared at the start."""
        return zlib.crc32(repr(sorted(asdict(self).items())).encode())


class StageModule(nn.Module):
    """One stage of the pipeline: its layers of the model (with the embedding on the first, the head on the
    last), passing the attention mask on beside the hidden states so that every stage masks alike. Counts the
    seconds it computes, forward and backward, apart from those it waits for its neighbours."""

    def __init__(self, peft_model: nn.Module, part: Part, last: bool, slowdown: float = 1.0):
        super().__init__()
        self.model, self.part, self.last = peft_model, part, last
        # Benchmarks emulate a slower node on one machine: it waits out what a node this much slower would
        # still be computing, for a backward what the last one computed (the first taken as twice its forward).
        self.slowdown, self.forward_s, self.backward_s = slowdown, 0.0, 0.0
        self.busy_s = 0.0
        self.backward_began = self.last_gradient_at = None
        for parameter in trainable(peft_model):
            parameter.register_post_accumulate_grad_hook(self._gradient_done)

    def forward(self, first: torch.Tensor, attention_mask: torch.Tensor):
        started = time.perf_counter()
        if first.requires_grad:  # a stage's backward ends with its input's gradient, or its first adapter's
            first.register_hook(self._gradient_done)
        out = self.part(first, attention_mask)
        self.forward_s = time.perf_counter() - started
        self._emulate(self.forward_s)
        self.busy_s += time.perf_counter() - started
        if out.requires_grad:
            out.register_hook(self._backward_starts)
        return out if self.last else (out, attention_mask)

    def _backward_starts(self, grad: torch.Tensor) -> None:
        self.settle()
        started = time.perf_counter()
        self._emulate(self.backward_s or 2 * self.forward_s)
        self.backward_began = time.perf_counter()
        self.busy_s += self.backward_began - started

    def _emulate(self, computed_s: float) -> None:
        if self.slowdown > 1:
            time.sleep((self.slowdown - 1) * computed_s)

    def _gradient_done(self, parameter: torch.Tensor) -> None:
        self.last_gradient_at = time.perf_counter()

    def settle(self) -> None:
        """Counts the last backward pass as busy: it ran from its output's gradient to its last adapter's."""
        if self.backward_began is not None and self.last_gradient_at is not None:
            self.backward_s = max(self.last_gradient_at - self.backward_began, 0.0)
            self.busy_s += self.backward_s
        self.backward_began = self.last_gradient_at = None


def build_stages(artifact, job: PipelineJob, rank: int,
                 slowdown: float = 1.0) -> tuple[list[tuple[int, StageModule]], nn.Module]:
    """Node ``rank``'s stages, each with its index in the pipeline, and its peft model: the base loaded, every layer
    outside its span dropped, LoRA on its span; in u-shaped mode the UE also runs the head, as the last stage.
    ``slowdown``: see ``StageModule``."""
    base = load_base(artifact)
    span, first, scores = job.spans[rank], rank == 0, rank == job.scorer
    last = scores and job.mode == "edge-loss"
    keep_only(base.family, span, embed=first, head=scores)
    peft_model = attach_lora(base.model, base.family, span, job.rank, job.alpha, job.seed)
    stages = [(rank, StageModule(peft_model, Part(base.family, span, embed=first, head=last), last, slowdown))]
    if scores and not last:
        head = Part(base.family, Span(job.num_layers, job.num_layers), embed=False, head=True)
        stages.append((job.stages, StageModule(head, head, True, slowdown)))
    return stages, peft_model


def u_shaped_order(ranks: int, microbatches: int, backward_first: bool) -> list[list[tuple[int, str, int] | None]]:
    """Each rank's action at each time step of a u-shaped pipeline, as (stage, "F" or "B", micro-batch) or None
    for idle: stage ``s`` runs on rank ``s % ranks``, so the head (stage ``ranks``) is back on rank 0. An action
    runs once what it needs ran at an earlier step (a forward its previous stage's forward, a backward its next
    stage's backward, or its own forward on the last stage); among ready actions each rank takes backwards first
    (1F1B, ``backward_first``) or forwards first (GPipe), the oldest micro-batch first. Every rank's list is as
    long as the longest, since a rank posts its receives at the step its neighbour sends."""
    stages = ranks + 1
    pending = {(stage, kind, micro) for stage in range(stages) for kind in "FB" for micro in range(microbatches)}
    ran_at: dict[tuple[int, str, int], int] = {}
    order: list[list[tuple[int, str, int] | None]] = [[] for _ in range(ranks)]

    def needs(stage: int, kind: str, micro: int) -> tuple[int, str, int] | None:
        if kind == "F":
            return (stage - 1, "F", micro) if stage else None
        return (stage + 1, "B", micro) if stage < stages - 1 else (stage, "F", micro)

    step = 0
    while pending:
        chosen = []
        for rank in range(ranks):
            ready = [action for action in pending if action[0] % ranks == rank
                     and (needs(*action) is None or ran_at.get(needs(*action), step) < step)]
            ready.sort(key=lambda action: ((action[1] == "F") == backward_first, action[2], action[0]))
            order[rank].append(ready[0] if ready else None)
            chosen += ready[:1]
        for action in chosen:
            ran_at[action] = step
            pending.discard(action)
        step += 1
    return order


def fixed_batches(batches: Iterator[Batch], seq_len: int, pad_id: int) -> Iterator[Batch]:
    """``batches`` padded (or cut) to ``seq_len`` positions: a pipeline's stages agree on the shapes they pass once,
    at the first step, so every step has the same."""
    for batch in batches:
        rows, length = batch.input_ids.shape
        ids = np.full((rows, seq_len), pad_id, np.int64)
        mask = np.zeros((rows, seq_len), np.int64)
        keep = min(length, seq_len)
        ids[:, :keep], mask[:, :keep] = batch.input_ids[:, :keep], batch.attention_mask[:, :keep]
        yield Batch(ids, mask, np.where(mask == 1, ids, IGNORE_INDEX))


def reference_run(artifact, job: PipelineJob, data: list[Batch]) -> tuple[list[float], dict[str, np.ndarray]]:
    """One process training the whole model's adapters on ``data`` with the pipeline's micro-batching (each
    micro-batch's mean loss over their number, summed into one optimizer step): the losses and the adapters a
    pipeline run must reproduce."""
    base = load_base(artifact)
    model = attach_lora(base.model, base.family, Span(0, job.num_layers), job.rank, job.alpha, job.seed)
    whole = Part(base.family, Span(0, job.num_layers), embed=True, head=True)
    optimizer = torch.optim.AdamW(trainable(model), job.lr, weight_decay=job.weight_decay)
    losses = []
    for batch in data:
        parts = [torch.from_numpy(array).tensor_split(job.microbatches)
                 for array in (batch.input_ids, batch.attention_mask, batch.labels)]
        step_losses = []
        for ids, mask, labels in zip(*parts):
            loss = causal_lm_loss(whole(ids, mask), labels)
            (loss / job.microbatches).backward()
            step_losses.append(float(loss.detach()))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(step_losses) / len(step_losses))
    return losses, trained_weights(model)


def u_shaped_schedule(stages: list, job: PipelineJob):
    """A schedule over this rank's ``stages`` of a u-shaped pipeline, in ``u_shaped_order``'s steps: torch's
    multi-stage runtime places stage ``s`` on rank ``s % ranks`` and runs any order of adjacent stages' actions."""
    from torch.distributed.pipelining.schedules import FORWARD, FULL_BACKWARD, PipelineScheduleMulti, _Action

    schedule = PipelineScheduleMulti(stages, job.microbatches, loss_fn=causal_lm_loss)
    kinds = {"F": FORWARD, "B": FULL_BACKWARD}
    order = u_shaped_order(job.stages, job.microbatches, backward_first=job.schedule == "1f1b")
    schedule.pipeline_order = {rank: [None if action is None else _Action(action[0], kinds[action[1]], action[2])
                                      for action in actions] for rank, actions in enumerate(order)}
    return schedule


@contextmanager
def node_errors(what: str, timeout_s: float):
    """What a lost or silent node raises in torch.distributed, as one line naming ``what`` was under way."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed's errors (DistError and gloo's) are RuntimeErrors
        line = next((text.strip() for text in reversed(str(error).splitlines()) if text.strip()), type(error).__name__)
        raise SeamError(f"{what} failed: {line[:300]}; every node must be up, with the same --rendezvous and "
                        f"settings, and answer within --timeout {timeout_s:g} s") from None


class PipelineRank:
    """This node's part of a run: its stage, its schedule and its optimizer, over a gloo process group."""

    def __init__(self, artifact, job: PipelineJob, rank: int, init_method: str, timeout_s: float,
                 slowdown: float = 1.0):
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if not 0 <= rank < job.stages:
            raise SeamError(f"--rank {rank}: this pipeline has ranks 0 to {job.stages - 1}, one per stage")
        self.dist, self.job, self.rank, self.timeout_s = dist, job, rank, timeout_s
        built, self.peft_model = build_stages(artifact, job, rank, slowdown)
        self.modules = [module for _, module in built]
        with node_errors(f"joining the {job.stages} nodes at {init_method}", timeout_s):
            dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=job.stages,
                                    timeout=timedelta(seconds=timeout_s))
            self.check_agreement()
        stages = [PipelineStage(module, index, job.pipeline_stages, torch.device("cpu")) for index, module in built]
        if job.mode == "u-shaped":
            self.schedule = u_shaped_schedule(stages, job)
        else:
            kind = ScheduleGPipe if job.schedule == "gpipe" else Schedule1F1B
            self.schedule = kind(stages[0], job.microbatches, loss_fn=causal_lm_loss)
        self.optimizer = torch.optim.AdamW(trainable(self.peft_model), job.lr, weight_decay=job.weight_decay)
        self.is_first = rank == 0

    def rank0_value(self, value: int) -> int:
        """Rank 0's ``value``, on every node (each node gives its own; rank 0's goes to all)."""
        shared = torch.tensor([value], dtype=torch.int64)
        self.dist.broadcast(shared, src=0)
        return int(shared)

    def check_agreement(self) -> None:
        """Every node must run the same job: rank 0's settings go to all, and a node that differs stops."""
        if self.rank0_value(self.job.fingerprint()) != self.job.fingerprint():
            raise SeamError("this node's settings differ from rank 0's (--stages, --schedule, --microbatches, --batch, "
                            "--seq-len, --steps, LoRA and optimizer flags); give every node the same")

    def step(self, batch: Batch | None) -> float:
        """One optimizer step over a batch (rank 0 gives it; the others pass None). Returns the step's mean loss
        on every rank (the last node scores it and tells the others)."""
        with node_errors("a training step", self.timeout_s):
            return self._step(batch)

    def _step(self, batch: Batch | None) -> float:
        dist, scorer = self.dist, self.job.scorer
        losses: list[torch.Tensor] = []
        if self.is_first:
            inputs = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
            if scorer == 0:
                self.schedule.step(*inputs, target=torch.from_numpy(batch.labels), losses=losses)
            else:
                dist.send(torch.from_numpy(batch.labels), dst=scorer)
                self.schedule.step(*inputs)
        elif self.rank == scorer:
            labels = torch.empty((self.job.batch, self.job.seq_len), dtype=torch.int64)
            dist.recv(labels, src=0)
            self.schedule.step(target=labels, losses=losses)
        else:
            self.schedule.step()
        self.optimizer.step()
        self.optimizer.zero_grad()
        mean = torch.tensor([sum(float(l) for l in losses) / len(losses)] if self.rank == scorer else [math.nan])
        dist.broadcast(mean, src=scorer)
        return float(mean)

    def agree_on_start(self, step: int) -> None:
        """Every node must carry on from the same step: a node resuming from another checkpoint stops."""
        with node_errors("agreeing on the step to resume from", self.timeout_s):
            theirs = self.rank0_value(step)
        if theirs != step:
            raise SeamError(f"this node would carry on from step {step}, rank 0 from step {theirs}; resume every "
                            "node from checkpoints written together (or none)")

    def training_state(self) -> dict[str, np.ndarray]:
        return training_state(self.peft_model, self.optimizer)

    def restore(self, state: dict[str, np.ndarray]) -> None:
        restore_training_state(self.peft_model, self.optimizer, state)

    def gathered(self, value, what: str) -> list | None:
        """Every stage's ``value``, in stage order on rank 0 (None on the others)."""
        found = [None] * self.job.stages if self.is_first else None
        with node_errors(f"gathering the {what}", self.timeout_s):
            self.dist.gather_object(value, found, dst=0)
        return found

    def busy_shares(self, wall_s: float) -> list[float] | None:
        """Each stage's seconds of compute over ``wall_s``, gathered on rank 0 (None on the others)."""
        for module in self.modules:
            module.settle()
        return self.gathered(sum(module.busy_s for module in self.modules) / wall_s, "busy shares")

    def adapters(self) -> list[dict[str, np.ndarray]] | None:
        """Every stage's trained adapters, gathered on rank 0 (None on the others)."""
        return self.gathered(trained_weights(self.peft_model), "adapters")

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
