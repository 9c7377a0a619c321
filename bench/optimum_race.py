"""Seam against optimum-onnx on the whole real model, side by side in one run: SmolLM2-135M-Instruct as Seam's
single block and cut at every layer (its blocks joined into one graph, as a running span is), against optimum's
single-graph export run by its ``ORTModelForCausalLM`` on onnxruntime (and the same graph through its bare
session, to tell the graph from the wrapper). Decode steps at past 128 and 2048 and a prefill of 512, two threads
on each side.

optimum-onnx pins a transformers older than the project's, so it never enters the project's environment: this
script makes (once, cached under bench/.work) an isolated venv with torch 2.13.0's CPU wheel and
``optimum-onnx[onnxruntime]``, writes the model as a plain transformers directory from the project's own GGUF
loader, and runs optimum in a child process of that venv (bench/_optimum_side.py) that it talks to over a pipe.

The sides alternate in rounds, so that the machine's drift falls on both alike: each round Seam's paths step in
this process (``timed``: warm-up, then paths in turn), then the child steps its paths the same way and returns
its medians; the figure of a path is the median of its round medians. Every decode step runs at the given past
(Seam rewinds its buffers, optimum is fed the same past each time). Both sides run onnxruntime with set thread
counts and intra-op spinning off, and only one of them runs at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import venv
from importlib.metadata import version
from pathlib import Path

import numpy as np

from _common import ROOT, WORK, real_model_every_layer, report, seam_decode_step, timed, work_export
from decode_growth import prefill_step

from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.shell import table
from seam.runtime.spans import Span

MODEL, THREADS = "smollm2-135m-instruct", 2
OPTIMUM_VENV, HF_DIR, ONNX_DIR = WORK / "optimum-venv", WORK / "smollm2-hf", WORK / "smollm2-optimum"
# torch pinned exactly: that resolves to the CPU wheel on disk, where any other spec pulls gigabytes of CUDA.
# onnxruntime pinned to the project's own, so that the two sides differ in their graphs and not in the runtime.
INSTALLS = (["torch==2.13.0"], ["optimum-onnx[onnxruntime]", f"onnxruntime=={version('onnxruntime')}"])
SEAM_PATHS = ("Seam, one block", "Seam, every layer, joined")
BASELINE = "optimum ORTModelForCausalLM"


def fail(message: str) -> None:
    print(f"optimum_race: {message}", file=sys.stderr)
    sys.exit(1)


def optimum_python() -> Path:
    """The isolated venv's interpreter, made and installed once; a ``.ready`` file marks a complete install of
    these INSTALLS (other ones make it anew)."""
    python, ready, log = OPTIMUM_VENV / "bin" / "python", OPTIMUM_VENV / ".ready", OPTIMUM_VENV / "install.log"
    wanted = json.dumps(INSTALLS)
    if ready.is_file() and ready.read_text().startswith(wanted + "\n"):
        return python
    print(f"making the isolated optimum venv in {OPTIMUM_VENV.relative_to(ROOT.parent)} (once, a few minutes)")
    venv.EnvBuilder(with_pip=True, clear=True).create(OPTIMUM_VENV)
    for packages in INSTALLS:
        with open(log, "a") as stream:
            done = subprocess.run([str(python), "-m", "pip", "install", *packages], stdout=stream,
                                  stderr=subprocess.STDOUT)
        if done.returncode != 0:
            fail(f"pip install {' '.join(packages)} into {OPTIMUM_VENV.relative_to(ROOT.parent)} failed "
                 f"(exit {done.returncode}); see {log.relative_to(ROOT.parent)}")
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    ready.write_text(wanted + "\n" + freeze)
    return python


def hf_directory() -> Path:
    """The packaged GGUF model as a plain transformers directory (fp32, dequantized by the project's loader)."""
    if (HF_DIR / "model.safetensors").is_file():
        return readable_by_transformers_4(HF_DIR)
    from seam.export.sources import load_model

    loaded = load_model(MODEL)
    # The loader dequantized the GGUF weights to plain fp32 tensors; transformers refuses to save them only
    # because the model still remembers the GGUF quantizer it came through.
    loaded.model.hf_quantizer = None
    if hasattr(loaded.model.config, "quantization_config"):
        del loaded.model.config.quantization_config
    loaded.model.save_pretrained(HF_DIR)
    loaded.tokenizer.save_pretrained(HF_DIR)
    return readable_by_transformers_4(HF_DIR)


def readable_by_transformers_4(directory: Path) -> Path:
    """``directory``, as transformers 5 wrote it, made readable by the venv's transformers 4 (idempotent)."""
    config_file, tokenizer_file = directory / "config.json", directory / "tokenizer_config.json"
    config, tokenizer = json.loads(config_file.read_text()), json.loads(tokenizer_file.read_text())
    # transformers 5 writes the rotary base only inside ``rope_parameters``; 4.x reads ``rope_theta`` and would
    # silently fall back to 10000 (a different model) without it.
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    # 5's fast tokenizer class over the same tokenizer.json is 4's PreTrainedTokenizerFast.
    if tokenizer.get("tokenizer_class") == "TokenizersBackend":
        tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_file.write_text(json.dumps(tokenizer, indent=2) + "\n")
    return directory


class OptimumSide:
    """The child process in the optimum venv, one JSON request and answer at a time over its pipes."""

    def __init__(self, python: Path, hf_dir: Path):
        self.log = WORK / "optimum-side.log"
        self.process = subprocess.Popen([str(python), str(ROOT / "_optimum_side.py"), str(hf_dir), str(ONNX_DIR),
                                         str(THREADS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=open(self.log, "w"), text=True, bufsize=1)
        self.meta = self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            fail(f"the optimum child stopped (exit {self.process.wait()}); see {self.log.relative_to(ROOT.parent)}")
        return json.loads(line)

    def ask(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def same_model(artifact: Artifact, side: OptimumSide) -> dict:
    """Both sides' last-position logits on one prompt: the same greedy token and a small difference show that
    they run the same weights and rotary base."""
    ids = np.random.default_rng(1).integers(3, 1000, (1, 16))
    runner = SessionPool(artifact, THREADS).runner(Span(0, artifact.num_layers))
    runner.reset(1)
    seam = runner.run(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])[0, -1]
    theirs = np.array(side.ask("logits", ids=ids[0].tolist())["logits"], np.float32)
    return {"max_abs_logit_diff": float(np.max(np.abs(seam - theirs))),
            "same_greedy_token": bool(seam.argmax() == theirs.argmax())}


def race(seam_paths: dict, side: OptimumSide, rounds: int, steps: int) -> dict[str, float]:
    """Median of each path's round medians, Seam's paths and then the child's in each round."""
    per_round: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, ms in timed(seam_paths, steps).items():
            per_round.setdefault(name, []).append(ms)
        for name, ms in side.ask("time", steps=steps)["ms"].items():
            per_round.setdefault(f"optimum {name}", []).append(ms)
    return {name: statistics.median(values) for name, values in per_round.items()}


def measure(artifacts: dict, side: OptimumSide, args) -> dict[str, dict[str, float]]:
    """Every path's median milliseconds at each past and for the prefill, keyed by path and then column."""
    columns: dict[str, dict[str, float]] = {}
    for past in args.pasts:
        side.ask("decode", past=past)
        seam_paths = {name: seam_decode_step(artifact, past, THREADS) for name, artifact in artifacts.items()}
        for name, ms in race(seam_paths, side, args.rounds, args.steps).items():
            columns.setdefault(name, {})[f"past {past}"] = ms
    side.ask("prefill", length=args.prefill)
    seam_paths = {name: prefill_step(artifact, None, args.prefill) for name, artifact in artifacts.items()}
    for name, ms in race(seam_paths, side, args.prefill_rounds, args.prefill_steps).items():
        columns[name][f"prefill {args.prefill}"] = ms
    return columns


def tabulate(columns: dict[str, dict[str, float]]) -> tuple[str, dict]:
    """The table of medians and of Seam's ratios to optimum's ``ORTModelForCausalLM``, and those ratios."""
    keys = list(columns[BASELINE])
    rows = [[name, *(f"{by_key[key]:.1f}" for key in keys)] for name, by_key in columns.items()]
    ratios = {name: {key: columns[name][key] / columns[BASELINE][key] for key in keys} for name in SEAM_PATHS}
    rows += [[f"{name} / optimum", *(f"{ratio[key]:.2f}x" for key in keys)] for name, ratio in ratios.items()]
    return table(["path", *(f"{key} ms" for key in keys)], rows), ratios


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pasts", default="128,2048", type=lambda text: [int(past) for past in text.split(",")])
    parser.add_argument("--rounds", type=int, default=8, help="alternations of the two sides per past")
    parser.add_argument("--steps", type=int, default=5, help="timed decode steps per path and round")
    parser.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill timed")
    parser.add_argument("--prefill-rounds", type=int, default=4)
    parser.add_argument("--prefill-steps", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse()
    started = time.perf_counter()
    python, hf_dir = optimum_python(), hf_directory()
    one_block = work_export(f"{MODEL}-cuts-none-shared-buffer", MODEL, cuts="none", kv_layout="shared-buffer")
    artifacts = dict(zip(SEAM_PATHS, (Artifact.open(one_block), Artifact.open(real_model_every_layer()))))
    side = OptimumSide(python, hf_dir)
    try:
        check = same_model(artifacts[SEAM_PATHS[0]], side)
        columns = measure(artifacts, side, args)
    finally:
        side.close()
    text, ratios = tabulate(columns)
    print(text)
    print(f"same model: {check}; optimum's graph: {side.meta['nodes']} nodes, attention operators "
          f"{side.meta['attention_ops']}, {side.meta['concat_nodes']} Concat, IO binding "
          f"{side.meta['use_io_binding']}, merged decoder {side.meta['merged_decoder']}")
    rounded = lambda table_: {name: {key: round(value, 3) for key, value in by_key.items()}  # noqa: E731
                              for name, by_key in table_.items()}
    report("optimum_race", {"model": MODEL, "threads": THREADS, "rounds": args.rounds, "steps": args.steps,
                            "prefill_rounds": args.prefill_rounds, "prefill_steps": args.prefill_steps,
                            "ms": rounded(columns), "seam_over_optimum": rounded(ratios), "same_model": check,
                            "optimum": side.meta, "wall_s": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
