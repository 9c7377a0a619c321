"""The edge's side of split fine-tuning (``edge_server --train``): LoRA adapters on layers [cut, L), trained from
the hidden states UEs send, with the gradient at the cut sent back.

Each step is two requests: ``TrainForward`` runs the edge's layers (and, in edge-loss mode, the head and the
loss) and keeps the graph; ``TrainBackward`` brings the gradient of the loss with respect to what the edge
returned, and the edge backpropagates, steps its optimizer and answers with the gradient at the cut. Sessions of
one job share the edge's adapters and optimizer, one step after another as their requests arrive: the sequential
SplitFed variant, in which the server-side model is a single one that every client trains in turn. A session
that names no job trains adapters of its own. Every array a UE sends is checked before it touches a graph; a bad
one gets an error reply and the session carries on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from seam.finetune.adapters import (pack_weights, restore_training_state, split_weights, trained_weights,
                               training_state)
from seam.finetune.federation import Federation
from seam.finetune.parts import (IGNORE_INDEX, Part, attach_lora, causal_lm_loss, frozen_copy, keep_only, load_base,
                                 trainable)
from seam.planning.memory import training_step_bytes
from seam.runtime.errors import SeamError
from seam.runtime.protocol import (TRAINING_MODES, AdapterWeights, Close, Closed, CutGradient, Error, FetchAdapter,
                              FetchRound, Message, OpenTraining, RoundAverage, TrainBackward, TrainForward,
                              TrainForwarded, TrainingOpened, UploadAdapter)
from seam.runtime.spans import Span

log = logging.getLogger("edge_server.training")


@dataclass
class Job:
    name: str  # "" for a session's job of its own
    size: int  # UEs its rounds wait for (0: those training in it)
    cut: int
    mode: str
    lora: dict
    model: torch.nn.Module  # the peft model holding this job's adapters
    part: Part
    optimizer: torch.optim.Optimizer
    adapter_bytes: int  # its adapters, their gradients and AdamW moments, as the training memory counts them
    steps: int = 0


@dataclass
class TrainingSession:
    job: Job
    client: str  # the name logs and round averages give the UE
    last_used: float
    next_step: int = 0
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (the cut's hidden states, what the edge returned)
    pending_since: float = 0.0
    pending_bytes: int = 0  # what the pending step's graph holds, as estimated
    compute_s: float = 0.0


@dataclass
class TrainingService:
    artifact: object
    threads: int | None = None
    idle_timeout_s: float = 300.0
    round_timeout_s: float = 60.0
    turn_timeout_s: float = 10.0  # a UE that sent a forward and no backward this long gives its job's turn up
    max_sessions: int = 16  # training sessions open at once
    max_step_tokens: int = 8192  # sequences x positions in one training step
    max_length: int = 4096  # positions per training sequence
    memory_budget_bytes: int = 2 << 30  # every job's adapters and optimizer state, plus the graphs steps keep
    sessions: dict[tuple[bytes, str], TrainingSession] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)  # the named ones, while a session trains in them

    def __post_init__(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        self.base = load_base(self.artifact)  # refuses weights other than the export's before any UE connects
        self.num_layers = len(self.base.family.layers())
        self.hidden_size = self.artifact.manifest.dims.hidden_size
        self.vocab_size = self.artifact.manifest.dims.vocab_size
        self.federation = Federation(self.round_timeout_s)

    def owns(self, peer: bytes, session_id: str) -> bool:
        return (peer, session_id) in self.sessions

    def handle(self, peer: bytes, message: Message) -> Message:
        self._expire(time.monotonic())
        key = (peer, getattr(message, "session_id", ""))
        try:
            if isinstance(message, OpenTraining):
                return self._open(key, message)
            session = self.sessions.get(key)
            if session is None:
                raise SeamError(f"unknown training session {key[1]!r}; open it with OpenTraining")
            session.last_used = time.monotonic()
            if isinstance(message, TrainForward):
                return self._forward(key[1], session, message)
            if isinstance(message, TrainBackward):
                return self._backward(key[1], session, message)
            if isinstance(message, FetchAdapter):
                job = session.job
                named = training_state(job.model, job.optimizer) if message.optimizer else trained_weights(job.model)
                return pack_weights(key[1], named)
            if isinstance(message, UploadAdapter):
                named = split_weights(message)
                self.federation.upload(self._job_name(session), session.client, message.round, message.samples,
                                       named, time.monotonic())
                return self._round(key[1], session, message.round)
            if isinstance(message, FetchRound):
                return self._round(key[1], session, message.round)
            if isinstance(message, Close):
                return self.close(key)
            raise SeamError(f"{message.kind!r} is not a training message")
        except JobBusy as error:
            return Error("busy", str(error), key[1])
        except SeamError as error:
            return Error("rejected", str(error), key[1])
        except Exception as error:  # a fault in one session must not take the others down
            log.exception("internal error in training session %r", key[1])
            if key in self.sessions:
                self._remove(key)
            return Error("internal", f"{type(error).__name__}: {error}; the training session was closed", key[1])

    def _job_name(self, session: TrainingSession) -> str:
        if not session.job.name:
            raise SeamError("federated rounds need a job: open the training session with a job name")
        return session.job.name

    def _round(self, session_id: str, session: TrainingSession, number: int) -> RoundAverage:
        expected = [other.client for other in self.sessions.values() if other.job is session.job]
        outcome = self.federation.fetch(self._job_name(session), number, expected, time.monotonic(),
                                        session.job.size)
        if not outcome.done:
            return RoundAverage(session_id, number, False)
        packed = pack_weights(session_id, outcome.average)
        return RoundAverage(session_id, number, True, outcome.averaged, outcome.dropped, packed.names, packed.shapes,
                            packed.data)

    def close(self, key: tuple[bytes, str]) -> Closed:
        session = self._remove(key)
        log.info("close training %s after %d steps", key[1], session.next_step)
        return Closed(key[1], {"steps": session.next_step, "edge_compute_s": round(session.compute_s, 6)})

    def _expire(self, now: float) -> None:
        for key in [key for key, session in self.sessions.items() if now - session.last_used > self.idle_timeout_s]:
            log.info("close training %s: idle", key[1])
            self._remove(key)

    def _remove(self, key: tuple[bytes, str]) -> TrainingSession:
        """Ends a session, and its job with the last of the job's sessions (a job holds a copy of the model)."""
        session = self.sessions.pop(key)
        if session.job.name and not any(other.job is session.job for other in self.sessions.values()):
            del self.jobs[session.job.name]
            self.federation.forget(session.job.name)
        return session

    def _open(self, key: tuple[bytes, str], request: OpenTraining) -> Message:
        if key in self.sessions:
            raise SeamError(f"training session {key[1]!r} is already open")
        if not 0 < request.cut < self.num_layers:
            raise SeamError(f"the cut must leave layers on both sides: 1 to {self.num_layers - 1}, got {request.cut}")
        if request.job_size < 0 or (request.job_size and not request.job):
            raise SeamError("a job size counts the UEs of a named job: give a job and a size of 0 or more")
        if request.mode not in TRAINING_MODES:
            raise SeamError(f"training mode {request.mode!r} is not one of {', '.join(TRAINING_MODES)}")
        lora = _options(request.lora, {"rank": int, "alpha": float, "seed": int}, "lora")
        optimizer = _options(request.optimizer, {"lr": float, "weight_decay": float}, "optimizer")
        if not (0 < optimizer["lr"] <= 1 and 0 <= optimizer["weight_decay"] <= 1):
            raise SeamError("the optimizer needs 0 < lr <= 1 and 0 <= weight_decay <= 1")
        if not 1 <= lora["rank"] <= self.hidden_size:  # a larger rank adds parameters and no expressiveness
            raise SeamError(f"lora rank must be 1 to {self.hidden_size} (the hidden size), got {lora['rank']}")
        if len(self.sessions) >= self.max_sessions:
            raise SeamError(f"this edge trains {self.max_sessions} sessions at most and all are taken; try later")
        job = self.jobs.get(request.job) if request.job else None
        if job is None:
            adapter_bytes = self._adapter_bytes(request.cut, lora["rank"])
            self._check_room(adapter_bytes, 0)
            model = frozen_copy(self.base.model)  # each job adapts its own modules; the base weights are shared
            family = type(self.base.family)(model)
            span = Span(request.cut, self.num_layers)
            keep_only(family, span, embed=False, head=request.mode == "edge-loss")
            peft_model = attach_lora(model, family, span, lora["rank"], lora["alpha"], lora["seed"])
            job = Job(request.job, request.job_size, request.cut, request.mode, lora, peft_model,
                      Part(family, span, embed=False, head=request.mode == "edge-loss"),
                      torch.optim.AdamW(trainable(peft_model), optimizer["lr"],
                                        weight_decay=optimizer["weight_decay"]), adapter_bytes)
            if request.resume is not None:
                restore_training_state(peft_model, job.optimizer, split_weights(AdapterWeights(
                    key[1], request.resume_names, request.resume_shapes, request.resume)))
            if request.job:
                self.jobs[request.job] = job
        elif (job.cut, job.mode, job.lora, job.size) != (request.cut, request.mode, lora, request.job_size):
            raise SeamError(f"job {request.job!r} trains at cut {job.cut} in {job.mode} mode with {job.lora} for "
                            f"{job.size or 'any number of'} UEs; join it with the same settings")
        elif request.resume is not None:
            raise SeamError(f"job {request.job!r} is already training; resume it before other UEs join")
        client = request.client or key[1][:8]
        if any(other.job is job and other.client == client for other in self.sessions.values()):
            raise SeamError(f"a UE named {client!r} already trains in job {request.job!r}; give each UE its own name")
        self.sessions[key] = TrainingSession(job, client, time.monotonic())
        log.info("open  training %s (%s) cut=%d mode=%s job=%s", key[1], client, request.cut, request.mode,
                 request.job or "-")
        return TrainingOpened(key[1], sum(parameter.numel() for parameter in trainable(job.model)))

    def _forward(self, session_id: str, session: TrainingSession, request: TrainForward) -> Message:
        if request.step != session.next_step:
            raise SeamError(f"training step {request.step} arrived, expected step {session.next_step}")
        hidden, mask = request.hidden_states, request.attention_mask
        if hidden.ndim != 3 or hidden.shape[2] != self.hidden_size or hidden.dtype != np.float32 or 0 in hidden.shape:
            raise SeamError(f"hidden_states must be float32 of shape [B, S, {self.hidden_size}], "
                            f"got {hidden.dtype.name} {list(hidden.shape)}")
        if mask.shape != hidden.shape[:2] or mask.dtype != np.int64 or not np.isin(mask, (0, 1)).all():
            raise SeamError(f"attention_mask must be int64 zeros and ones of shape {list(hidden.shape[:2])}")
        if not np.isfinite(hidden).all():  # one NaN forward would poison a job's shared adapters
            raise SeamError("hidden_states hold NaN or infinite values; the UE's layers produced them")
        labels = self._labels(session.job.mode, request.labels, hidden.shape[:2])
        graph_bytes = self._check_step(session, *hidden.shape[:2])
        self._take_turn(session)
        started = time.perf_counter()
        with torch.enable_grad():
            cut = torch.from_numpy(hidden.copy()).requires_grad_(True)
            output = session.job.part(cut, torch.from_numpy(mask))
            if labels is not None:
                output = causal_lm_loss(output, labels)
        session.pending, session.pending_since, session.pending_bytes = (cut, output), time.monotonic(), graph_bytes
        seconds = time.perf_counter() - started
        session.compute_s += seconds
        if labels is not None:
            return TrainForwarded(session_id, request.step, seconds, loss=float(output.item()))
        return TrainForwarded(session_id, request.step, seconds, hidden_states=output.detach().numpy())

    def _adapter_bytes(self, cut: int, rank: int) -> int:
        """A job's LoRA weights, gradients and AdamW moments: float32, four copies of each parameter."""
        layers = self.base.family.layers()
        parameters = sum(rank * sum(module.weight.shape) for index in range(cut, self.num_layers)
                         for name, module in layers[index].named_modules()
                         if name.rsplit(".", 1)[-1] in self.base.family.lora_targets)
        return 16 * parameters

    def _check_room(self, adapter_bytes: int, graph_bytes: int, replacing: TrainingSession | None = None) -> None:
        """Refuses what would take the training memory past its budget, before anything is allocated; the graph
        ``replacing`` keeps is about to go."""
        needed = (adapter_bytes + graph_bytes) / 2**20
        if adapter_bytes + graph_bytes > self.memory_budget_bytes:
            raise SeamError(f"this needs {needed:.1f} MiB, more than the edge's whole training memory "
                            f"({self.memory_budget_bytes / 2**20:.0f} MiB); use a smaller batch, shorter sequences "
                            "or a lower rank")
        jobs = {id(session.job): session.job for session in self.sessions.values()}.values()
        held = sum(job.adapter_bytes for job in jobs)
        held += sum(session.pending_bytes for session in self.sessions.values()
                    if session.pending is not None and session is not replacing)
        if held + adapter_bytes + graph_bytes > self.memory_budget_bytes:
            raise JobBusy(f"this edge's training memory ({self.memory_budget_bytes / 2**20:.0f} MiB) holds "
                          f"{held / 2**20:.0f} MiB and this needs {needed:.1f} MiB more; try again later, or with a "
                          "smaller batch, shorter sequences or a lower rank")

    def _check_step(self, session: TrainingSession, batch: int, length: int) -> int:
        """The graph bytes of a step of ``batch`` sequences of ``length``, refused beyond the bounds."""
        if length > self.max_length or batch * length > self.max_step_tokens:
            raise SeamError(f"a training step holds at most {self.max_step_tokens} tokens of at most {self.max_length} "
                            f"positions each, got {batch} x {length}; send smaller batches or shorter sequences")
        job = session.job
        graph_bytes = training_step_bytes(self.artifact.manifest.dims, self.num_layers - job.cut, batch, length,
                                          head=job.mode == "edge-loss")
        self._check_room(0, graph_bytes, replacing=session)
        return graph_bytes

    def _take_turn(self, session: TrainingSession) -> None:
        """UEs of one job step its shared adapters one at a time: an optimizer step between another UE's forward
        and backward would change weights its graph still needs."""
        now = time.monotonic()
        for other in self.sessions.values():
            if other is not session and other.job is session.job and other.pending is not None:
                if now - other.pending_since < self.turn_timeout_s:
                    raise JobBusy(f"{other.client} is mid-step in job {session.job.name!r}; send the forward again")
                log.info("training %s lost its turn: no backward for %.0f s", other.client, now - other.pending_since)
                other.pending = None

    def _labels(self, mode: str, labels: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor | None:
        if mode == "u-shaped":
            if labels is not None:
                raise SeamError("labels are refused in u-shaped mode: they stay on the UE")
            return None
        if labels is None:
            raise SeamError("edge-loss mode needs the labels of every step")
        if labels.shape != shape or labels.dtype != np.int64:
            raise SeamError(f"labels must be int64 of shape {list(shape)}")
        if not ((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < self.vocab_size))).all():
            raise SeamError(f"labels must be token ids below {self.vocab_size} or {IGNORE_INDEX}")
        return torch.from_numpy(labels)

    def _backward(self, session_id: str, session: TrainingSession, request: TrainBackward) -> Message:
        if session.pending is None or request.step != session.next_step:
            raise SeamError(f"a backward for step {request.step} arrived; send the forward of step "
                            f"{session.next_step} first")
        cut, output = session.pending
        grad = request.grad
        if grad.dtype != np.float32 or grad.size != output.numel() or not np.isfinite(grad).all():
            raise SeamError(f"grad must hold {output.numel()} finite float32 values, shaped as what the edge returned "
                            f"({list(output.shape)}), got {grad.dtype.name} {list(grad.shape)}")
        started = time.perf_counter()
        output.backward(torch.from_numpy(grad.copy()).reshape(output.shape))
        job = session.job
        session.pending = None
        if not all(torch.isfinite(p.grad).all() for group in job.optimizer.param_groups for p in group["params"]
                   if p.grad is not None):
            job.optimizer.zero_grad()  # never a non-finite update of adapters other UEs share
            raise SeamError(f"training step {request.step} gave non-finite adapter gradients and was dropped; "
                            "send that step's forward again")
        job.optimizer.step()
        job.optimizer.zero_grad()
        job.steps += 1
        session.next_step += 1
        seconds = time.perf_counter() - started
        session.compute_s += seconds
        return CutGradient(session_id, request.step, seconds, cut.grad.numpy())


class JobBusy(SeamError):
    """Another UE of the job holds its turn; the request is fine and may be sent again."""


def _options(given: dict, expected: dict[str, type], what: str) -> dict:
    if set(given) != set(expected):
        raise SeamError(f"{what} options must be exactly {', '.join(expected)}; got {', '.join(given) or 'none'}")
    values = {}
    for name, kind in expected.items():
        value = given[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise SeamError(f"{what} option {name} must be a{'n integer' if kind is int else ' number'}")
        if not math.isfinite(value):
            raise SeamError(f"{what} option {name} must be finite")
        values[name] = kind(value)
    return values
