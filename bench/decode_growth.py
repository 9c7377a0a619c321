"""How a decode step's cost grows with the context, and what cutting at every layer costs: the shared-buffer KV
layout against the concat layout and against transformers' eager PyTorch, at batch 1, from 128 to 2048 positions
of context, and a prefill of 512.

The model (small-llama, or ``--model smollm2-135m-instruct``) is exported as one block and cut at every layer, in
each KV layout. Every-layer artifacts run their blocks joined into one graph, as a running span does, and once
more block by block. Every path steps in turn within one run so that the machine's drift falls on each alike, and
every step runs at the given past length (the cache is rewound after it: the shared buffers by their length, the
concat cache by its arrays).

"The attention's own growth" is what the attention itself must add from 128 to 2048 positions: a graph of the
model's ``GroupQueryAttention`` operators alone, one per layer with the model's heads, reading the same buffers,
timed at both lengths in the same run. A layout's excess is its step at 2048 over its step at 128 plus that
growth: 1.0 means the step grew by exactly what the attention reads, and the goal is at most 1.2.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import report, seam_decode_step, timed, torch_decode_step, work_export

from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.kv_buffers import KvBuffers
from seam.runtime.shell import table
from seam.runtime.spans import Span

THREADS = 2


def attention_step(artifact: Artifact, past: int):
    """The model's attention operators alone, one per layer over buffers of ``past`` positions."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    dims = artifact.manifest.dims
    heads, kv_heads, head_dim, layers = dims.num_attention_heads, dims.num_kv_heads, dims.head_dim, dims.num_layers
    inputs = [helper.make_tensor_value_info("query", TensorProto.FLOAT, [1, 1, heads * head_dim]),
              helper.make_tensor_value_info("key", TensorProto.FLOAT, [1, 1, kv_heads * head_dim]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    nodes, outputs, buffers = [], [], []
    for layer in range(layers):
        past_names = [f"past_key.{layer}", f"past_value.{layer}"]
        buffers += past_names
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, kv_heads, "capacity", head_dim])
                   for name in past_names]
        outs = [f"output.{layer}", f"present_key.{layer}", f"present_value.{layer}"]
        nodes.append(helper.make_node("GroupQueryAttention", ["query", "key", "key", *past_names, "seqlens_k",
                                                              "total_sequence_length"], outs, domain="com.microsoft",
                                      num_heads=heads, kv_num_heads=kv_heads))
        outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outs]
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    store = KvBuffers(buffers, 1, (kv_heads, head_dim), np.dtype(np.float32))
    store.reserve(past + 1)
    rng = np.random.default_rng(0)
    query = rng.standard_normal((1, 1, heads * head_dim)).astype(np.float32)
    key = rng.standard_normal((1, 1, kv_heads * head_dim)).astype(np.float32)
    lengths = {"seqlens_k": np.array([past], np.int32), "total_sequence_length": np.array(past + 1, np.int32)}

    def step() -> None:
        binding = session.io_binding()
        binding.bind_cpu_input("query", query)
        binding.bind_cpu_input("key", key)
        for name, value in lengths.items():
            binding.bind_cpu_input(name, value)
        for layer in range(layers):
            binding.bind_output(f"output.{layer}")
            for kind in ("key", "value"):
                binding.bind_ortvalue_input(f"past_{kind}.{layer}", store.values[f"past_{kind}.{layer}"])
                binding.bind_ortvalue_output(f"present_{kind}.{layer}", store.values[f"past_{kind}.{layer}"])
        session.run_with_iobinding(binding)
    return step


def prefill_step(artifact: Artifact | None, model, length: int):
    """A prefill of ``length`` tokens from an empty cache: through every layer of ``artifact`` in one process
    (its blocks joined), or in ``model``, transformers' eager PyTorch."""
    import torch

    vocab = model.config.vocab_size if artifact is None else artifact.manifest.dims.vocab_size
    ids = np.random.default_rng(0).integers(3, min(1000, vocab), (1, length))
    if artifact is None:
        def step() -> None:
            with torch.no_grad():
                model(torch.from_numpy(ids), use_cache=True)
        return step
    runner = SessionPool(artifact, THREADS).runner(Span(0, artifact.num_layers))
    runner.join_blocks(wait=True)
    mask, positions = np.ones((1, length), np.int64), np.arange(length)[None]

    def step() -> None:
        runner.reset(1)
        runner.run(ids, mask, positions)
    return step


def main() -> None:
    import torch

    from seam.export.sources import load_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="small-llama")
    parser.add_argument("--pasts", default="128,2048")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill timed")
    args = parser.parse_args()
    pasts = [int(past) for past in args.pasts.split(",")]
    torch.set_num_threads(THREADS)
    artifacts = {}
    for layout in ("shared-buffer", "concat"):
        for name, cuts in (("one block", "none"), ("every layer", "all")):
            out = work_export(f"{args.model}-cuts-{cuts}-{layout}", args.model, cuts=cuts, kv_layout=layout)
            artifacts[f"{layout}, {name}"] = Artifact.open(out)
    reference = load_model(args.model).model
    any_artifact = next(iter(artifacts.values()))
    medians: dict[str, dict[int, float]] = {}
    for past in pasts:
        paths = {name: seam_decode_step(artifact, past, THREADS) for name, artifact in artifacts.items()}
        # The every-layer artifact's blocks one by one, as before a span's graphs were joined.
        paths["shared-buffer, every layer, blocks apart"] = seam_decode_step(artifacts["shared-buffer, every layer"],
                                                                            past, THREADS, merge=False)
        paths["transformers eager"] = torch_decode_step(reference, past)
        paths["attention alone"] = attention_step(any_artifact, past)
        for name, ms in timed(paths, args.steps).items():
            medians.setdefault(name, {})[past] = ms
    prefills = timed({**{name: prefill_step(artifact, None, args.prefill) for name, artifact in artifacts.items()},
                      "transformers eager": prefill_step(None, reference, args.prefill)}, max(args.steps // 4, 5))
    short, long = pasts[0], pasts[-1]
    attention_growth = medians["attention alone"][long] - medians["attention alone"][short]
    rows, results = [], {}
    for name, by_past in medians.items():
        excess = by_past[long] / (by_past[short] + attention_growth)
        results[name] = {**{str(past): round(ms, 2) for past, ms in by_past.items()},
                         "growth": round(by_past[long] / by_past[short], 3), "excess": round(excess, 3),
                         **({f"prefill_{args.prefill}": round(prefills[name], 1)} if name in prefills else {})}
        rows.append([name, *(f"{by_past[past]:.2f}" for past in pasts), f"{by_past[long] / by_past[short]:.2f}x",
                     "-" if name == "attention alone" else f"{excess:.2f}x",
                     f"{prefills[name]:.1f}" if name in prefills else "-"])
    print(table(["path", *(f"past {past} ms" for past in pasts), "growth", "beyond the attention's own",
                 f"prefill {args.prefill} ms"], rows))
    suffix = "" if args.model == "small-llama" else f"-{args.model}"
    report(f"decode_growth{suffix}", {"model": args.model, "threads": THREADS, "steps": args.steps,
                                      "decode_ms": results})


if __name__ == "__main__":
    main()
