"""The KV cache in the shared-buffer layout: per layer a buffer of keys and one of values, [rows, kv_heads,
capacity, head_dim], that the blocks read and write in place.

A step binds each buffer, as one ``OrtValue``, as the block's past and as its present, so the graph's
``GroupQueryAttention`` writes the new positions where they belong and nothing else of the cache moves. A
``KvBuffers`` is one batch of sequences: consecutive rows of a ``KvArena``, its first ``length`` positions
filled. An edge keeps one arena per span for all its sessions there, so sessions that decode together run as one
batch over their rows, each row attending to its own length (``seam.runtime.batching.run_together``); elsewhere
each batch has an arena of its own. An arena that runs out of rows or positions moves into one twice as large,
so growing to ``n`` positions copies fewer than ``2 n`` in all: a constant per token, where the concat layout
copies the whole cache every step. The memory is a numpy array onnxruntime reads and writes directly;
``views`` and ``assign`` are how moves, the wire and the memory accounting see it.
"""

from __future__ import annotations

import weakref

import numpy as np
import onnxruntime as ort

MIN_CAPACITY = 64  # positions: a short chat's cache fits at once, and doubling from here copies little


class KvArena:
    """Rows of buffers shared by the ``KvBuffers`` that hold them; a row whose buffers were dropped is free."""

    def __init__(self, names: list[str], kv_shape: tuple[int, int], dtype: np.dtype):
        self.names, self.kv_shape, self.dtype = names, kv_shape, dtype
        self.arrays: dict[str, np.ndarray] = {}
        self.owners: list[weakref.ref | None] = []  # per row: the buffers holding it
        self.generation = 0  # bumped whenever the arrays move, so that buffers rebuild their OrtValues

    @property
    def rows(self) -> int:
        return len(self.owners)

    @property
    def capacity(self) -> int:
        return next(iter(self.arrays.values())).shape[2] if self.arrays else 0

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def _resize(self, rows: int, capacity: int) -> None:
        shape = (rows, self.kv_shape[0], capacity, self.kv_shape[1])
        old, kept = self.arrays, min(self.capacity, capacity)
        self.arrays = {name: np.zeros(shape, dtype=self.dtype) for name in self.names}
        for name, array in old.items():
            self.arrays[name][: array.shape[0], :, :kept] = array[:, :, :kept]
        self.owners += [None] * (rows - len(self.owners))
        self.generation += 1

    def reserve(self, total: int) -> None:
        """Room for ``total`` positions in every row."""
        if total > self.capacity:
            self._resize(self.rows, max(total, 2 * self.capacity, MIN_CAPACITY))

    def take(self, buffers: KvBuffers) -> int:
        """Consecutive free rows for ``buffers``' batch; returns the first."""
        run = 0
        for row, owner in enumerate(self.owners):
            run = run + 1 if owner is None or owner() is None else 0
            if run == buffers.batch:
                first = row - run + 1
                break
        else:
            first = self.rows
            self._resize(max(2 * self.rows, self.rows + buffers.batch), max(self.capacity, MIN_CAPACITY))
        self.owners[first: first + buffers.batch] = [weakref.ref(buffers)] * buffers.batch
        return first

    def release(self, first: int, count: int) -> None:
        self.owners[first: first + count] = [None] * count

    def compact(self) -> None:
        """Moves the rows in use to the front and gives back what no buffers need, once at most a quarter of the
        rows or of the positions is in use (to half: the next session or the next doubling finds room)."""
        holders = list({id(b): b for b in (ref() for ref in self.owners if ref is not None) if b is not None}.values())
        used = sum(buffers.batch for buffers in holders)
        needed = max([MIN_CAPACITY, *(buffers.length for buffers in holders)])
        if 4 * used > self.rows and 4 * needed > self.capacity:
            return
        rows, capacity = 2 * used, min(self.capacity, 2 * needed)
        shape = (rows, self.kv_shape[0], capacity, self.kv_shape[1])
        arrays = {name: np.zeros(shape, dtype=self.dtype) for name in self.names}
        self.owners, first = [None] * rows, 0
        for buffers in sorted(holders, key=lambda b: b.first_row):
            for name, array in arrays.items():
                kept = self.arrays[name][buffers.rows, :, : buffers.length]
                array[first: first + buffers.batch, :, : buffers.length] = kept
            buffers.first_row = first
            self.owners[first: first + buffers.batch] = [weakref.ref(buffers)] * buffers.batch
            first += buffers.batch
        self.arrays = arrays
        self.generation += 1

    def values(self, start: int, end: int) -> dict[str, ort.OrtValue]:
        """Rows [start, end) of every buffer as OrtValues sharing the arena's memory."""
        return {name: ort.OrtValue.ortvalue_from_numpy(array[start:end]) for name, array in self.arrays.items()}


class KvBuffers:
    """One batch of sequences' cache: ``batch`` consecutive rows of ``arena`` from ``first_row``, ``length``
    positions so far."""

    def __init__(self, names: list[str], batch: int, kv_shape: tuple[int, int], dtype: np.dtype,
                 arena: KvArena | None = None):
        self.arena = arena or KvArena(names, kv_shape, dtype)
        self.batch, self.length = batch, 0
        self.first_row = self.arena.take(self)
        self._values: dict[str, ort.OrtValue] = {}
        self._generation = -1

    @property
    def rows(self) -> slice:
        return slice(self.first_row, self.first_row + self.batch)

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    @property
    def nbytes(self) -> int:
        """This batch's share of the arena, at its capacity."""
        return self.arena.nbytes * self.batch // max(self.arena.rows, 1)

    @property
    def values(self) -> dict[str, ort.OrtValue]:
        """Each buffer's rows of this batch as the OrtValues a step binds."""
        if self._generation != self.arena.generation:
            self._values, self._generation = self.arena.values(self.rows.start, self.rows.stop), self.arena.generation
        return self._values

    def reserve(self, total: int) -> None:
        self.arena.reserve(total)

    def views(self) -> dict[str, np.ndarray]:
        """Each buffer's positions so far, [B, kv_heads, length, head_dim] views of the arena."""
        return {name: array[self.rows, :, : self.length] for name, array in self.arena.arrays.items()}

    def assign(self, cache: dict[str, np.ndarray]) -> None:
        """Holds ``cache`` (every name, [B, kv_heads, past, head_dim] arrays) from now on."""
        first = cache[self.arena.names[0]]
        if first.shape[0] != self.batch:
            self.arena.release(self.first_row, self.batch)
            self.batch = first.shape[0]
            self.first_row = self.arena.take(self)
        self.arena.reserve(first.shape[2])
        for name, array in self.arena.arrays.items():
            array[self.rows, :, : first.shape[2]] = cache[name]
        self.length = first.shape[2]

    def row_values(self, row: int) -> dict[str, ort.OrtValue]:
        """Each buffer's row ``row`` of this batch as a batch of one, sharing the arena's memory."""
        return self.arena.values(self.first_row + row, self.first_row + row + 1)
