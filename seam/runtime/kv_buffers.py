"""The KV cache in the shared-buffer layout: per layer a buffer of keys and one of values, [rows, kv_heads,
capacity, head_dim], that the blocks read and write in place.

A step binds each buffer, as one ``OrtValue``, as the block's past and as its present, so the graph's
``GroupQueryAttention`` writes the new positions where they belong and nothing else of the cache moves. A
``KvBuffers`` is one batch of sequences: consecutive rows of a ``KvArena``, its first ``length`` positions
filled. An edge keeps one arena per span for all its sessions there, so sessions that decode together run as one
batch over their rows, each row attending to its own length (``seam.runtime.batching.run_together``); elsewhere
each batch has an arena of its own. An arena that runs out of rows or positions moves into one twice as large,
so growing to ``n`` positions copies fewer than ``2 n`` in all: a constant per token, where the concat layout
copies the whole cache every step.

The memory lives where the blocks run (``HostMemory`` on the CPU, ``DeviceMemory`` on CUDA): a step binds rows
of it by address (``RowsAt``), one code path for both, so that on a GPU a step moves only its hidden states
across PCIe. ``views`` and ``assign`` are how moves and the wire see a cache: views of the arena on the host, and
copies of its rows on a device, as rare as the moves themselves.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

MIN_CAPACITY = 64  # positions: a short chat's cache fits at once, and doubling from here copies little


@dataclass(frozen=True)
class RowsAt:
    """Rows of one arena buffer as a step binds them: where they are and their shape."""

    device: str
    device_id: int
    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype


class HostMemory:
    """Arena buffers in host memory: numpy arrays that onnxruntime reads and writes in place."""

    device, device_id = "cpu", 0

    def allocate(self, host: np.ndarray) -> np.ndarray:
        return host

    def pointer(self, buffer: np.ndarray) -> int:
        return buffer.ctypes.data

    def to_host(self, buffer: np.ndarray) -> np.ndarray:
        return buffer

    def read_rows(self, buffer: np.ndarray, rows: slice, length: int) -> np.ndarray:
        return buffer[rows, :, :length]

    def write_rows(self, buffer: np.ndarray, first: int, values: np.ndarray) -> None:
        buffer[first: first + values.shape[0], :, : values.shape[2]] = values


class DeviceMemory:
    """Arena buffers on an onnxruntime device (CUDA, or the CPU to test this path): ``OrtValue``s that stay there
    between steps. Rows cross to and from the host only when a cache moves or is sent, through a one-node copy
    graph bound to their address; a resize goes through the host, which doubling makes rare."""

    def __init__(self, device: str, device_id: int = 0):
        self.device, self.device_id = device, device_id
        self._copies: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()

    def allocate(self, host: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(host, self.device, self.device_id)

    def pointer(self, buffer: ort.OrtValue) -> int:
        return buffer.data_ptr()

    def to_host(self, buffer: ort.OrtValue) -> np.ndarray:
        return buffer.numpy()

    def read_rows(self, buffer: ort.OrtValue, rows: slice, length: int) -> np.ndarray:
        shape, dtype = (rows.stop - rows.start, *buffer.shape()[1:]), self._dtype(buffer)
        copy = self._copy(dtype)
        binding = copy.io_binding()
        binding.bind_input("x", self.device, self.device_id, dtype, shape,
                           self.pointer(buffer) + rows.start * _row_bytes(buffer.shape(), dtype))
        binding.bind_output("y", "cpu")
        copy.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[:, :, :length]

    def write_rows(self, buffer: ort.OrtValue, first: int, values: np.ndarray) -> None:
        full = np.zeros((values.shape[0], *buffer.shape()[1:]), dtype=values.dtype)
        full[:, :, : values.shape[2]] = values
        copy = self._copy(values.dtype)
        binding = copy.io_binding()
        binding.bind_cpu_input("x", full)
        binding.bind_output("y", self.device, self.device_id, values.dtype, full.shape,
                            self.pointer(buffer) + first * _row_bytes(buffer.shape(), values.dtype))
        copy.run_with_iobinding(binding)

    @staticmethod
    def _dtype(buffer: ort.OrtValue) -> np.dtype:
        return np.dtype({"tensor(float)": np.float32, "tensor(float16)": np.float16}[buffer.data_type()])

    def _copy(self, dtype: np.dtype) -> ort.InferenceSession:
        """A session of one Identity node for ``dtype`` on this device (built on first use; onnx only here)."""
        with self._lock:
            if dtype.name not in self._copies:
                from onnx import TensorProto, helper

                from seam.runtime.ort_options import providers_for, session_options

                element = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype.name]
                dims = ["rows", "heads", "capacity", "head_dim"]
                graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "copy",
                                          [helper.make_tensor_value_info("x", element, dims)],
                                          [helper.make_tensor_value_info("y", element, dims)])
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                model.ir_version = 8
                self._copies[dtype.name] = ort.InferenceSession(model.SerializeToString(), session_options(1),
                                                                providers=providers_for(self.device))
            return self._copies[dtype.name]


def _row_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape[1:]) * np.dtype(dtype).itemsize


class KvArena:
    """Rows of buffers shared by the ``KvBuffers`` that hold them; a row whose buffers were dropped is free."""

    def __init__(self, names: list[str], kv_shape: tuple[int, int], dtype: np.dtype,
                 memory: HostMemory | DeviceMemory | None = None):
        self.names, self.kv_shape, self.dtype = names, kv_shape, dtype
        self.memory = memory or HostMemory()
        self.arrays: dict[str, object] = {}  # per name the buffer: [rows, kv_heads, capacity, head_dim]
        self.shape = (0, kv_shape[0], 0, kv_shape[1])
        self.owners: list[weakref.ref | None] = []  # per row: the buffers holding it
        self.generation = 0  # bumped whenever the arrays move, so that buffers rebuild their OrtValues

    @property
    def rows(self) -> int:
        return len(self.owners)

    @property
    def capacity(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        """What the arena holds, where it lives (device memory on CUDA)."""
        return len(self.arrays) * math.prod(self.shape) * self.dtype.itemsize

    def _rearrange(self, rows: int, capacity: int, moves: list[tuple[slice, int, int]]) -> None:
        """New buffers of ``rows`` x ``capacity`` holding, for each (old rows, new first row, positions) of
        ``moves``, those positions of those rows: through the host, since a resize is rare."""
        shape = (rows, self.kv_shape[0], capacity, self.kv_shape[1])
        arrays = {}
        for name in self.names:
            host = np.zeros(shape, dtype=self.dtype)
            if name in self.arrays:
                old = self.memory.to_host(self.arrays[name])
                for rows_from, first, positions in moves:
                    host[first: first + rows_from.stop - rows_from.start, :, :positions] = old[rows_from, :, :positions]
            arrays[name] = self.memory.allocate(host)
        self.arrays, self.shape = arrays, shape
        self.generation += 1

    def _resize(self, rows: int, capacity: int) -> None:
        self._rearrange(rows, capacity, [(slice(0, self.rows), 0, min(self.capacity, capacity))])
        self.owners += [None] * (rows - len(self.owners))

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
        holders.sort(key=lambda b: b.first_row)
        firsts = np.cumsum([0] + [buffers.batch for buffers in holders]).tolist()
        self._rearrange(rows, capacity, [(b.rows, first, b.length) for b, first in zip(holders, firsts)])
        self.owners = [None] * rows
        for buffers, first in zip(holders, firsts):
            buffers.first_row = first
            self.owners[first: first + buffers.batch] = [weakref.ref(buffers)] * buffers.batch

    def values(self, start: int, end: int) -> dict[str, RowsAt]:
        """Rows [start, end) of every buffer, as a step binds them in place."""
        row_bytes = _row_bytes(self.shape, self.dtype)
        return {name: RowsAt(self.memory.device, self.memory.device_id,
                             self.memory.pointer(buffer) + start * row_bytes, (end - start, *self.shape[1:]),
                             self.dtype)
                for name, buffer in self.arrays.items()}


class KvBuffers:
    """One batch of sequences' cache: ``batch`` consecutive rows of ``arena`` from ``first_row``, ``length``
    positions so far."""

    def __init__(self, names: list[str], batch: int, kv_shape: tuple[int, int], dtype: np.dtype,
                 arena: KvArena | None = None, memory: HostMemory | DeviceMemory | None = None):
        self.arena = arena or KvArena(names, kv_shape, dtype, memory)
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
    def live_bytes(self) -> int:
        """The bytes of its positions so far."""
        heads, head_dim = self.arena.kv_shape
        return len(self.arena.names) * self.batch * self.length * heads * head_dim * self.arena.dtype.itemsize

    @property
    def values(self) -> dict[str, RowsAt]:
        """Each buffer's rows of this batch as the OrtValues a step binds."""
        if self._generation != self.arena.generation:
            self._values, self._generation = self.arena.values(self.rows.start, self.rows.stop), self.arena.generation
        return self._values

    def reserve(self, total: int) -> None:
        self.arena.reserve(total)

    def views(self) -> dict[str, np.ndarray]:
        """Each buffer's positions so far, [B, kv_heads, length, head_dim]: views of the arena on the host, copies
        of its rows from a device."""
        return {name: self.arena.memory.read_rows(buffer, self.rows, self.length)
                for name, buffer in self.arena.arrays.items()}

    def assign(self, cache: dict[str, np.ndarray]) -> None:
        """Holds ``cache`` (every name, [B, kv_heads, past, head_dim] arrays) from now on."""
        first = cache[self.arena.names[0]]
        if first.shape[0] != self.batch:
            self.arena.release(self.first_row, self.batch)
            self.batch = first.shape[0]
            self.first_row = self.arena.take(self)
        self.arena.reserve(first.shape[2])
        for name, buffer in self.arena.arrays.items():
            self.arena.memory.write_rows(buffer, self.first_row, np.asarray(cache[name], self.arena.dtype))
        self.length = first.shape[2]

    def row_values(self, row: int) -> dict[str, RowsAt]:
        """Each buffer's row ``row`` of this batch as a batch of one, sharing the arena's memory."""
        return self.arena.values(self.first_row + row, self.first_row + row + 1)
