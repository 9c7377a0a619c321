"""One graph per running span: the blocks of layers ``[a, b)`` joined into a single ONNX graph, so that a side
running many one-layer blocks (an artifact cut at every layer, for a split that can move anywhere) pays for one
onnxruntime run per step instead of one per block.

Blocks share their inputs by name (the prelude's outputs, the mask lengths), each layer's past and present names
are global, and a block's output feeds the next block's first input. Joining them is therefore renaming: every
other name inside block ``k`` gets the prefix ``k/`` (exporters reuse names such as ``onnx::MatMul_255``), the
output of each block but the last becomes ``hidden.CUT`` and the next block's ``hidden_states`` reads it. With
``boundaries`` those ``hidden.CUT`` are also outputs of the graph, for a runner that keeps the hidden states at
its cuts. Without ``head`` the graph returns the last layer's hidden states before the final norm
(``final_hidden``) in place of the logits, and the head's nodes and weights are pruned away: an edge serving private
output computes no logits. Such a graph is built for a single block too.

A joined graph is written once under ``$SEAM_HOME/merged/<artifact fingerprint>/`` (the artifact directory may be
read-only and holds only what its export wrote) through a temporary file renamed into place, so a later load
opens one file; concurrent builders of the same span each write a whole file and the last rename wins. Spans
whose weights pass ``MAX_JOINED_BYTES`` keep their blocks: one protobuf holds at most 2 GiB, and at that size a
run is long enough that one more per block costs next to nothing.
"""

from __future__ import annotations

from pathlib import Path

from seam.runtime.artifact import FINAL_HIDDEN, Artifact
from seam.runtime.errors import SeamError
from seam.runtime.files import seam_home, write_atomically
from seam.runtime.spans import Span

# Inputs every block of a step takes under the same name: fed once, read by every joined block.
SHARED_INPUTS = ("input_ids", "position_ids", "attention_bias", "rope_cos", "rope_sin", "seqlens_k",
                 "total_sequence_length", "logits_to_keep")
MAX_JOINED_BYTES = 1 << 30  # weights of a span joined into one graph


def merged_path(artifact: Artifact, span: Span, variant: str, boundaries: bool, head: bool = True) -> Path:
    suffix = ("-boundaries" if boundaries else "") + ("" if head else "-headless")
    return (seam_home() / "merged" / artifact.manifest.artifact_fingerprint[:32] /
            f"{variant}-{span.start}-{span.end}{suffix}.onnx")


def _global(name: str) -> bool:
    return name in SHARED_INPUTS or name == FINAL_HIDDEN or name.startswith(("past_key_values.", "present."))


def join_blocks(artifact: Artifact, span: Span, variant: str, boundaries: bool, head: bool = True):
    """The blocks of ``span`` as one ``onnx.ModelProto`` (see the module's docstring)."""
    import onnx

    blocks = artifact.blocks_for(span)
    weights = sum(block.variants[variant].weight_bytes for block in blocks)
    if weights > MAX_JOINED_BYTES:
        raise SeamError(f"layers {span} hold {weights >> 20} MiB of weights, more than one graph joins")
    graph = onnx.GraphProto(name=f"layers_{span.start}_{span.end}")
    seen_inputs: set[str] = set()
    outputs, extra_outputs = [], []
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        model = onnx.load(str(artifact.path(block.variants[variant])))
        output_name = model.graph.output[0].name

        def renamed(name: str, index=index, block=block, output_name=output_name) -> str:
            if not name or _global(name):
                return name
            if name == "hidden_states":
                return name if index == 0 else f"hidden.{block.layers.start}"
            if name == output_name:
                return name if index == last else f"hidden.{block.layers.end}"
            return f"{index}/{name}"

        for node in model.graph.node:
            node.input[:] = [renamed(name) for name in node.input]
            node.output[:] = [renamed(name) for name in node.output]
            node.name = f"{index}/{node.name}"
        for tensor in model.graph.initializer:
            tensor.name = renamed(tensor.name)
        for info in model.graph.value_info:
            info.name = renamed(info.name)
        graph.node.extend(model.graph.node)
        graph.initializer.extend(model.graph.initializer)
        graph.value_info.extend(model.graph.value_info)
        for value in model.graph.input:
            value.name = renamed(value.name)
            if not value.name.startswith("hidden.") and value.name not in seen_inputs:
                seen_inputs.add(value.name)
                graph.input.append(value)
        for position, value in enumerate(model.graph.output):
            value.name = renamed(value.name)
            if position > 0:
                extra_outputs.append(value)  # the layers' presents
            elif index == last:
                outputs.insert(0, value)  # the span's own output first, as a block's
            elif boundaries:
                outputs.append(value)
    graph.output.extend([*outputs, *extra_outputs])
    if not head:
        _drop_head(graph)
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _drop_head(graph) -> None:
    """Makes ``final_hidden`` the graph's first output in place of the logits, and removes every node, weight
    and input that only the logits needed."""
    by_name = {value.name: value for value in graph.output}
    if FINAL_HIDDEN not in by_name:
        raise SeamError("the last block has no final_hidden output; re-export the artifact with 'seam export ... "
                        "--force'")
    kept_outputs = [by_name[FINAL_HIDDEN]] + [value for value in graph.output
                                              if value.name not in (FINAL_HIDDEN, "logits")]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    needed = {value.name for value in kept_outputs}
    kept_nodes = []
    for node in reversed(graph.node):  # a graph's nodes are in topological order
        if any(name in needed for name in node.output):
            kept_nodes.append(node)
            needed.update(name for name in node.input if name)
    for field, keep in ((graph.node, kept_nodes[::-1]),
                        (graph.initializer, [t for t in graph.initializer if t.name in needed]),
                        (graph.input, [v for v in graph.input if v.name in needed]),
                        (graph.value_info, [v for v in graph.value_info if v.name in needed])):
        kept = list(keep)
        del field[:]
        field.extend(kept)


def merged_graph(artifact: Artifact, span: Span, variant: str, boundaries: bool = False, head: bool = True) -> Path:
    """The path of the joined graph of ``span``, building it first if no earlier load did."""
    path = merged_path(artifact, span, variant, boundaries, head)
    if path.is_file():
        return path
    model = join_blocks(artifact, span, variant, boundaries, head)
    return write_atomically(path, lambda out: out.write(model.SerializeToString()), binary=True)
