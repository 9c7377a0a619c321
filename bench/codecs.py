"""Activation codecs at the cut: bytes on the link, encode and decode time, and the error they add.

For a decode step [1, 1, H] and a prefill [1, 128, H], per codec: encoded bytes and their ratio to fp32, the
median encode and decode time per call (timeit: each repeat runs the call enough times to last a few
milliseconds), and the relative error (RMS error over RMS signal) on two activations: a plain Gaussian, and a
realistic one that adds the few large outlier channels LLM hidden states carry, which dominate per-row and
per-group absmax scales.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from functools import partial

import numpy as np

from _common import report

from seam.runtime.shell import table
from seam.runtime.codecs import CODECS, decode, encoded_bytes

OUTLIER_CHANNELS = 4
OUTLIER_SCALE = 30.0


def gaussian(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def with_outliers(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same channels are large in every token, as in LLM hidden states."""
    channels = rng.choice(x.shape[-1], OUTLIER_CHANNELS, replace=False)
    y = x.copy()
    y[..., channels] *= OUTLIER_SCALE
    return y


def relative_error(name: str, x: np.ndarray) -> float:
    error = decode(CODECS[name].encode(x)) - x
    return float(np.sqrt(np.mean(np.square(error, dtype=np.float64)) / np.mean(np.square(x, dtype=np.float64))))


def median_us(call, repeats: int) -> float:
    timer = timeit.Timer(call)
    number = max(1, int(timer.autorange()[0] / 50))  # autorange targets 0.2 s; a repeat lasts about 4 ms
    return 1e6 * statistics.median(t / number for t in timer.repeat(repeat=repeats, number=number))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=51)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shapes = {"decode": (1, 1, args.hidden), "prefill": (1, args.prefill, args.hidden)}
    rows, result = [], {"hidden": args.hidden, "outlier_channels": OUTLIER_CHANNELS, "outlier_scale": OUTLIER_SCALE}
    for step, shape in shapes.items():
        plain = gaussian(shape, rng)
        realistic = with_outliers(plain, rng)
        result[step] = {"shape": list(shape), "codecs": {}}
        for name, codec in CODECS.items():
            encoded = codec.encode(realistic)
            entry = {
                "bytes": encoded_bytes(name, shape),
                "ratio_to_fp32": round(encoded_bytes(name, shape) / encoded_bytes("fp32", shape), 4),
                "encode_us": round(median_us(partial(codec.encode, realistic), args.repeats), 2),
                "decode_us": round(median_us(partial(codec.decode, encoded), args.repeats), 2),
                "rel_error_gaussian": float(f"{relative_error(name, plain):.3g}"),
                "rel_error_outliers": float(f"{relative_error(name, realistic):.3g}"),
            }
            result[step]["codecs"][name] = entry
            rows.append([f"{step} {list(shape)}", name, *map(str, entry.values())])
    headers = ["step", "codec", "bytes", "x fp32", "encode us", "decode us", "rel err gauss", "rel err outliers"]
    print(table(headers, rows))
    report("codecs", result)


if __name__ == "__main__":
    main()
