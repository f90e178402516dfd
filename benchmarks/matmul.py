"""Why the float32 update is several times slower than the bf16 one on a CPU: the matrix products themselves.

Times the embedded model's linear shapes (hidden 576, MLP 1536, vocabulary 49,152) as the learner runs them, on
``--tokens`` rows, forward and backward (``torch.nn.functional.linear``), in float32 and under bf16 autocast, and
prints GFLOP/s and the ratio, next to the CPU's bf16 support (AVX512-BF16 / AMX dot products do twice the work of
a float32 FMA per instruction, on half the bytes).

    python benchmarks/matmul.py [--tokens 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spo.models import setup_cpu_math  # noqa: E402

SHAPES = {"attention projection": (576, 576), "MLP up": (576, 1536), "MLP down": (1536, 576),
          "vocabulary head": (576, 49152)}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def seconds(rows: int, fan_in: int, fan_out: int, bf16: bool, repeats: int) -> float:
    x = torch.randn(rows, fan_in, requires_grad=True)
    weight = torch.randn(fan_out, fan_in, requires_grad=True)
    times = []
    for run in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = torch.nn.functional.linear(x, weight)
        out.float().sum().backward()
        if run:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    setup_cpu_math()
    flags = cpu_flags()
    print(f"{torch.get_num_threads()} threads; CPU bf16 dot products: avx512_bf16 {'avx512_bf16' in flags}, "
          f"amx_bf16 {'amx_bf16' in flags}")
    print(f"{'shape':<22}{'fp32 GFLOP/s':>14}{'bf16 GFLOP/s':>14}{'bf16 / fp32':>13}")
    for name, (fan_in, fan_out) in SHAPES.items():
        flops = 3 * 2 * options.tokens * fan_in * fan_out  # forward, and the two products of the backward
        fp32 = seconds(options.tokens, fan_in, fan_out, False, options.repeats)
        bf16 = seconds(options.tokens, fan_in, fan_out, True, options.repeats)
        print(f"{name:<22}{flops / fp32 / 1e9:>14.1f}{flops / bf16 / 1e9:>14.1f}{fp32 / bf16:>12.2f}x")


if __name__ == "__main__":
    main()
