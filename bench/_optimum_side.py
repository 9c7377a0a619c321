"""The optimum side of bench/optimum_race.py: a child process in the isolated optimum-onnx environment that exports
the model with optimum once, runs it through optimum's ``ORTModelForCausalLM`` on onnxruntime, and times the
steps the parent asks for.

It imports only what that environment has (optimum-onnx, its transformers, torch, onnx, onnxruntime, numpy),
never the project: the environment's transformers is older than the project's. It talks JSON lines: requests on
stdin, one answer line each on the process's original stdout; everything else the libraries print goes to
stderr, so that no warning can break the protocol.

Usage (by the parent): python _optimum_side.py HF_DIR ONNX_DIR THREADS
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from optimum.onnxruntime import ORTModelForCausalLM

WARMUP = 3  # as bench/_common.py's timed()


def session_options(threads: int) -> ort.SessionOptions:
    """Seam's options (seam/runtime/ort_options.py) for a single session: set thread counts, no spinning."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def exported(hf_dir: Path, onnx_dir: Path) -> Path:
    """optimum's export of ``hf_dir`` (text generation with past), made once into a scratch directory and moved
    into ``onnx_dir`` only when complete, so that an interrupted export is never taken for a cached one."""
    if not (onnx_dir / "model.onnx").is_file():
        partial = onnx_dir.with_name(onnx_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        ORTModelForCausalLM.from_pretrained(hf_dir, export=True, use_cache=True).save_pretrained(partial)
        shutil.rmtree(onnx_dir, ignore_errors=True)
        partial.rename(onnx_dir)
    return onnx_dir


def describe(model: ORTModelForCausalLM, onnx_dir: Path) -> dict:
    """What the graph is: its operators, how its KV cache flows, and the versions that made and run it."""
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    attention = sorted(op for op in ops if "Attention" in op)
    # The KV inputs all look alike: the first one stands for them.
    shown = [item for item in graph.input if not item.name.startswith("past_key_values.") or ".0." in item.name]
    inputs = {item.name: [dim.dim_param or dim.dim_value for dim in item.type.tensor_type.shape.dim] for item in shown}
    outputs = {item.name: [dim.dim_param or dim.dim_value for dim in item.type.tensor_type.shape.dim]
               for item in graph.output}
    return {"versions": {name: version(name) for name in ("optimum-onnx", "optimum", "transformers", "torch",
                                                          "onnx", "onnxruntime", "numpy")},
            "nodes": len(graph.node), "top_ops": dict(ops.most_common(12)),
            "attention_ops": attention or "none (MatMul, Softmax and friends)",
            "concat_nodes": ops.get("Concat", 0), "use_io_binding": bool(model.use_io_binding),
            "merged_decoder": bool(model.is_merged), "file_mb": round((onnx_dir / "model.onnx").stat().st_size / 2**20),
            "inputs": inputs, "outputs": list(outputs)[:3],
            "logits_shape": outputs.get("logits")}


def decode_paths(model: ORTModelForCausalLM, past: int) -> dict:
    """A decode step at ``past`` through ``ORTModelForCausalLM`` and through its bare session, each fed the same
    past every time: the concat graph leaves its input cache untouched, so that is the rewind."""
    vocab = model.config.vocab_size
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, min(1000, vocab), (1, past)))  # as Seam's
    with torch.no_grad():
        cache = model(ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    token, mask, position = torch.tensor([[42]]), torch.ones((1, past + 1), dtype=torch.int64), torch.tensor([[past]])
    flat = dict(zip(model.key_value_input_names, (tensor.numpy() for pair in cache for tensor in pair)))
    feed = {"input_ids": token.numpy(), "attention_mask": mask.numpy(), "position_ids": position.numpy(), **flat}
    feed = {item.name: feed[item.name] for item in model.session.get_inputs()}

    def wrapped() -> None:
        with torch.no_grad():
            model(token, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
    return {"ORTModelForCausalLM": wrapped, "graph, bare session": lambda: model.session.run(None, feed)}


def prefill_paths(model: ORTModelForCausalLM, length: int) -> dict:
    """A prefill of ``length`` tokens from an empty cache, through the wrapper and through the bare session."""
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, min(1000, model.config.vocab_size), (1, length)))
    mask, positions = torch.ones_like(ids), torch.arange(length)[None]
    kv = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    empty = np.zeros((1, kv[0], 0, kv[1]), np.float32)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(),
            **{name: empty for name in model.key_value_input_names}}
    feed = {item.name: feed[item.name] for item in model.session.get_inputs()}

    def wrapped() -> None:
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return {"ORTModelForCausalLM": wrapped, "graph, bare session": lambda: model.session.run(None, feed)}


def timed(paths: dict, steps: int) -> dict[str, float]:
    """Median milliseconds of each path, the paths stepping in turn after WARMUP rounds: the method of
    bench/_common.py's timed(), which this environment cannot import."""
    times = {name: [] for name in paths}
    for index in range(steps + WARMUP):
        for name, step in paths.items():
            started = time.perf_counter()
            step()
            if index >= WARMUP:
                times[name].append(time.perf_counter() - started)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def last_logits(model: ORTModelForCausalLM, ids: list[int]) -> list[float]:
    with torch.no_grad():
        tensor = torch.tensor([ids])
        return model(tensor, attention_mask=torch.ones_like(tensor), use_cache=True).logits[0, -1].tolist()


def serve(model: ORTModelForCausalLM, answer) -> None:
    """Answers requests until 'quit' or the end of stdin: prepare a decode or prefill, time it, or give logits."""
    paths: dict = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            return
        if request["op"] == "decode":
            paths = decode_paths(model, request["past"])
            answer({"paths": list(paths)})
        elif request["op"] == "prefill":
            paths = prefill_paths(model, request["length"])
            answer({"paths": list(paths)})
        elif request["op"] == "time":
            answer({"ms": timed(paths, request["steps"])})
        elif request["op"] == "logits":
            answer({"logits": last_logits(model, request["ids"])})
        else:
            answer({"error": f"unknown request {request['op']!r}"})


def main() -> None:
    hf_dir, onnx_dir, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    # The protocol keeps the original stdout; fd 1 becomes stderr for whatever the libraries print, C code too.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    torch.set_num_threads(threads)  # the wrapper's own torch work, on the same cores
    started = time.perf_counter()
    exported(hf_dir, onnx_dir)
    export_s = time.perf_counter() - started
    model = ORTModelForCausalLM.from_pretrained(onnx_dir, provider="CPUExecutionProvider",
                                                session_options=session_options(threads), use_cache=True)
    answer({"ready": True, "export_or_load_s": round(export_s, 1), **describe(model, onnx_dir)})
    serve(model, answer)


if __name__ == "__main__":
    main()
