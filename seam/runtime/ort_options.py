"""onnxruntime session options, defined once for the runtime and the profiler alike.

Default options let the idle threads of several sessions spin and starve each other on a small CPU: a chain of
blocks ran at half speed. Spinning is therefore off and thread counts are set explicitly.

On the CPU every session draws from one arena shared by the process. With an arena each, a chain of one-layer
blocks kept every layer's attention scores of the longest step it ever ran: a 2048-position prefill of
small-llama's last six layers grew the process by 2758 MiB, against 480 MiB from a shared arena (and decode ran
no slower).
"""

from __future__ import annotations

import functools
import os

import onnxruntime as ort
import psutil

from seam.runtime.errors import SeamError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@functools.cache
def _share_cpu_arena() -> None:
    """Registers the process's one CPU arena, which sessions opened with ``session.use_env_allocators`` use."""
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))


def session_options(threads: int | None = None) -> ort.SessionOptions:
    _share_cpu_arena()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.log_severity_level = 3
    return options


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device`` ('cpu' or 'cuda'), refusing one this onnxruntime lacks."""
    if device not in PROVIDERS:
        raise SeamError(f"unknown device {device!r}: choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[device]
    available = ort.get_available_providers()
    if wanted not in available:
        raise SeamError(
            f"device {device!r} needs {wanted}, but this onnxruntime offers only {', '.join(available)}; "
            "install the 'gpu' extra on a CUDA machine or use --device cpu"
        )
    return [wanted] if wanted == PROVIDERS["cpu"] else [wanted, PROVIDERS["cpu"]]


def open_session(path: str, threads: int | None = None, device: str = "cpu") -> ort.InferenceSession:
    return ort.InferenceSession(path, sess_options=session_options(threads), providers=providers_for(device))
