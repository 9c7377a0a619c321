"""The UE's side of split fine-tuning: LoRA adapters on layers [0, cut) trained in ordinary PyTorch, the edge's
layers standing in the graph as one autograd function whose forward and backward are requests to the edge.

In edge-loss mode the function maps the hidden states at the cut (and the labels, which travel with them) to the
loss; u-shaped, it maps them to the last layer's hidden states, and the UE's own head turns those into the loss,
so that labels never leave the device. Token ids never do, in either mode: the UE always runs the embedding.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import torch

from seam.finetune.adapters import pack_weights, restore_training_state
from seam.finetune.data import Batch
from seam.finetune.parts import Part, adapter_key, attach_lora, causal_lm_loss, keep_only, load_base, trainable
from seam.runtime.errors import SeamError
from seam.runtime.protocol import (AdapterWeights, Close, Closed, CutGradient, Error, FetchAdapter, FetchRound, OpenTraining,
                              RoundAverage, TrainBackward, TrainForward, TrainForwarded, TrainingOpened, UploadAdapter)
from seam.runtime.spans import Span
from seam.runtime.replies import expect

BUSY_RETRY_S = 0.005


class EdgeTraining:
    """One training session on the edge, over a connected ``EdgeClient``'s socket."""

    def __init__(self, client, cut: int, mode: str, lora: dict, optimizer: dict, job: str = "", name: str = "",
                 resume: dict[str, np.ndarray] | None = None, job_size: int = 0):
        self.client, self.mode = client, mode
        self.session_id = uuid.uuid4().hex
        self.step = 0
        opening = OpenTraining(self.session_id, cut, mode, lora, optimizer, job, name, job_size=job_size)
        if resume:
            state = pack_weights(self.session_id, resume)
            opening.resume_names, opening.resume_shapes, opening.resume = state.names, state.shapes, state.data
        opened = self._request(opening, TrainingOpened)
        self.edge_parameters = opened.edge_parameters
        self.edge_compute_s = 0.0

    def _request(self, message, kind):
        return expect(self.client.socket.request(message), kind)

    def forward(self, hidden: np.ndarray, mask: np.ndarray, labels: np.ndarray | None) -> TrainForwarded:
        message = TrainForward(self.session_id, self.step, hidden, mask, labels)
        reply = self.client.socket.request(message)
        deadline = time.monotonic() + self.client.socket.config.timeout_s
        while isinstance(reply, Error) and reply.code == "busy" and time.monotonic() < deadline:
            time.sleep(BUSY_RETRY_S)  # another UE of the job is mid-step on the edge's shared adapters
            reply = self.client.socket.request(message)
        reply = expect(reply, TrainForwarded)
        self.edge_compute_s += reply.edge_compute_s
        return reply

    def backward(self, grad: np.ndarray) -> np.ndarray:
        reply = self._request(TrainBackward(self.session_id, self.step, grad), CutGradient)
        self.edge_compute_s += reply.edge_compute_s
        self.step += 1
        return reply.grad

    def adapter(self, optimizer: bool = False) -> AdapterWeights:
        """The edge's adapters (and with ``optimizer`` its optimizer's state, to resume from)."""
        return self._request(FetchAdapter(self.session_id, optimizer), AdapterWeights)

    def federate(self, number: int, samples: int, weights: dict[str, np.ndarray], wait_s: float,
                 poll_s: float = 0.2) -> RoundAverage:
        """Uploads this UE's adapters for round ``number`` and waits, asking every ``poll_s``, for the round's
        average: until every UE of the job has uploaded, or the edge closes the round without the late ones."""
        packed = pack_weights(self.session_id, weights)
        reply = self._request(UploadAdapter(self.session_id, number, samples, packed.names, packed.shapes,
                                            packed.data), RoundAverage)
        deadline = time.monotonic() + wait_s
        while not reply.done:
            if time.monotonic() > deadline:
                raise SeamError(f"round {number} did not close within {wait_s:g} s; the edge may be waiting for "
                                "UEs that never joined (see edge_server --round-timeout)")
            time.sleep(poll_s)
            reply = self._request(FetchRound(self.session_id, number), RoundAverage)
        return reply

    def close(self) -> dict:
        return self._request(Close(self.session_id), Closed).stats


class RemoteLayers(torch.autograd.Function):
    """The edge's layers: forward sends the hidden states at the cut, backward sends the gradient of what came
    back and returns the gradient at the cut."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, edge: EdgeTraining, mask: torch.Tensor, labels: torch.Tensor | None):
        ctx.edge = edge
        reply = edge.forward(hidden.detach().numpy(), mask.numpy(), None if labels is None else labels.numpy())
        if labels is not None:
            return torch.tensor(reply.loss, dtype=torch.float32)
        if reply.hidden_states is None or reply.hidden_states.shape != tuple(hidden.shape):
            raise SeamError(f"the edge returned hidden states of shape {getattr(reply.hidden_states, 'shape', None)}"
                            f", expected {list(hidden.shape)}")
        return torch.from_numpy(reply.hidden_states.copy())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        values = grad_output.detach().float()
        grad = ctx.edge.backward(np.ascontiguousarray((values.reshape(1) if values.ndim == 0 else values).numpy()))
        return torch.from_numpy(grad.copy()), None, None, None


class SplitTrainer:
    """LoRA on this device's layers [0, cut), trained with the edge's layers [cut, L) over ``client``."""

    def __init__(self, artifact, client, cut: int, mode: str = "edge-loss", rank: int = 8, alpha: float = 16.0,
                 lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, job: str = "", name: str = "",
                 resume: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None, job_size: int = 0):
        """``resume``: the (UE, edge) training states of a checkpoint to carry on from."""
        base = load_base(artifact)
        self.num_layers = len(base.family.layers())
        if not 0 < cut < self.num_layers:
            raise SeamError(f"the cut must leave layers on both sides: 1 to {self.num_layers - 1}, got {cut}")
        keep_only(base.family, Span(0, cut), embed=True, head=mode == "u-shaped")
        self.model = attach_lora(base.model, base.family, Span(0, cut), rank, alpha, seed)
        self.bottom = Part(base.family, Span(0, cut), embed=True, head=False)
        self.top = Part(base.family, Span(self.num_layers, self.num_layers), False, True) if mode == "u-shaped" \
            else None
        self.optimizer = torch.optim.AdamW(trainable(self.model), lr, weight_decay=weight_decay)
        self.edge = EdgeTraining(client, cut, mode, {"rank": rank, "alpha": alpha, "seed": seed},
                                 {"lr": lr, "weight_decay": weight_decay}, job, name, resume[1] if resume else None,
                                 job_size)
        self.cut, self.mode = cut, mode
        if resume:
            restore_training_state(self.model, self.optimizer, resume[0])

    def load(self, weights: dict[str, np.ndarray]) -> None:
        """Replaces this device's adapters, e.g. with a round's federated average."""
        slots = {adapter_key(name): parameter for name, parameter in self.model.named_parameters()
                 if parameter.requires_grad}
        if set(weights) != set(slots):
            raise SeamError("the averaged adapter does not hold this device's layers; every UE of a job must train "
                            "the same layers with the same rank")
        with torch.no_grad():
            for name, values in weights.items():
                slots[name].copy_(torch.from_numpy(np.asarray(values, np.float32)).reshape(slots[name].shape))

    def step(self, batch: Batch) -> float:
        """One optimizer step on both sides; returns the batch's loss before it."""
        ids, mask, labels = (torch.from_numpy(array) for array in (batch.input_ids, batch.attention_mask,
                                                                    batch.labels))
        hidden = self.bottom(ids, mask)
        if self.top is None:
            loss = RemoteLayers.apply(hidden, self.edge, mask, labels)
        else:
            loss = causal_lm_loss(self.top(RemoteLayers.apply(hidden, self.edge, mask, None), mask), labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.item())
