"""Federated averaging of the UEs' own adapters (the federated server of FedsLLM, here a role of the edge server).

Each UE of a job trains its layers' adapters locally for a round, together with the job's edge-side adapters,
then uploads them with the number of samples it trained on. A round closes when every UE training in the job has
uploaded, and at least the job's size of them (UEs start at different times), or when ``round_timeout_s`` has
passed since the first upload: a UE that went silent is left out of that round (and logged), the others' average
goes back to them. A UE that uploads to a round already closed gets its average without joining it. The average
is FedAvg: each weight the sample-weighted mean of the uploads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from seam.runtime.errors import SeamError

log = logging.getLogger("edge_server.training")


def fedavg(uploads: Mapping[str, tuple[int, Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """The sample-weighted mean of each named weight over ``uploads`` (client -> (samples, weights))."""
    total = sum(samples for samples, _ in uploads.values())
    names = next(iter(uploads.values()))[1]
    return {name: sum(samples * weights[name] for samples, weights in uploads.values()) / total for name in names}


@dataclass
class Round:
    started_at: float
    uploads: dict[str, tuple[int, dict[str, np.ndarray]]] = field(default_factory=dict)
    average: dict[str, np.ndarray] | None = None
    dropped: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    done: bool
    averaged: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    average: dict[str, np.ndarray] | None = None


class Federation:
    def __init__(self, round_timeout_s: float):
        self.round_timeout_s = round_timeout_s
        self.rounds: dict[tuple[str, int], Round] = {}

    def upload(self, job: str, client: str, number: int, samples: int, weights: dict[str, np.ndarray],
               now: float) -> None:
        if number < 0 or samples < 1:
            raise SeamError(f"an upload needs a round of 0 or more and at least one sample, got round {number} "
                            f"with {samples} samples")
        if not all(np.isfinite(values).all() for values in weights.values()):
            raise SeamError("the uploaded adapter holds values that are not finite; the round was not joined")
        current = self.rounds.setdefault((job, number), Round(now))
        if current.average is not None:
            log.info("round %d of job %s: %s came late and takes the average without joining it", number, job, client)
            return
        if client in current.uploads:
            raise SeamError(f"{client} already uploaded for round {number}")
        if current.uploads:
            first = next(iter(current.uploads.values()))[1]
            if {name: values.shape for name, values in weights.items()} != \
                    {name: values.shape for name, values in first.items()}:
                raise SeamError(f"the uploaded adapter's weights differ from the other UEs' in round {number}; "
                                "every UE of a job must train the same layers with the same rank")
        current.uploads[client] = (samples, weights)

    def fetch(self, job: str, number: int, expected: list[str], now: float, size: int = 0) -> Outcome:
        """The round's average once every one of ``expected`` (the UEs training in the job), and at least ``size``
        UEs, uploaded, or once its time ran out."""
        current = self.rounds.get((job, number))
        if current is None:
            raise SeamError(f"round {number} of job {job!r} has no upload yet; upload first")
        if current.average is None:
            waiting = [client for client in expected if client not in current.uploads]
            complete = not waiting and len(current.uploads) >= size
            if not complete and now - current.started_at < self.round_timeout_s:
                return Outcome(False)
            current.average, current.dropped = fedavg(current.uploads), waiting
            for old in [key for key in self.rounds if key[0] == job and key[1] < number - 1]:
                del self.rounds[old]  # a UE late for those has moved on without them
            log.info("round %d of job %s: averaged %d UEs (%s)%s", number, job, len(current.uploads),
                     ", ".join(sorted(current.uploads)), f"; dropped out: {', '.join(waiting)}" if waiting else "")
        return Outcome(True, sorted(current.uploads), current.dropped, current.average)

    def forget(self, job: str) -> None:
        """Drops the rounds of a job that ended."""
        for key in [key for key in self.rounds if key[0] == job]:
            del self.rounds[key]
