"""Segment self-attention alone: XLA's masked attention vs the fused CPU kernel.

One layer's attention core (q, k, v -> softmax(q k^T / sqrt(Dh)) v within segments), forward and
forward + backward, on the shared workload's rows: its images packed by the project's packer into
[rows, seq_len] with the workload's heads and head size (ViT-S/16: 21 x 256, 6 heads of 64).

    python experiments/benchmarks/attention.py --workload ../shared/bench/navit_s16_train.json

Prints readable figures, then one JSON line last. GFLOP/s count each image's own n x n block
(the useful work: 4 n^2 Dh per head forward, twice that backward), whatever an implementation
computes; the fused kernel's backward also recomputes the scores (not counted).
"""

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import train_step  # experiments/benchmarks/train_step.py: the workload and its packing

from navit_seq import cpu_runtime
from navit_seq.models import attention


def time_calls(functions, args, *, warmup: int, repeats: int) -> list[float]:
    """Median seconds of each blocking call, calls interleaved so all see the same load."""
    times = [[] for _ in functions]
    for round_index in range(warmup + repeats):
        for function, spent in zip(functions, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(function(*args))
            if round_index >= warmup:
                spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpu_runtime.synchronous_cpu_dispatch()
    cpu_runtime.keep_freed_memory()
    workload = train_step.load_workload(args.workload)
    images, labels = train_step.random_images(workload), train_step.random_labels(workload)
    segment_ids = train_step.pack_workload(images, labels, workload)["segment_ids"]  # [B, L]
    rows, seq_len = segment_ids.shape
    head_dim = workload.width // workload.num_heads
    rng = np.random.default_rng(workload.seed)
    shape = (rows, seq_len, workload.num_heads, head_dim)
    query, key, value, d_out = (rng.normal(size=shape).astype(np.float32) for _ in range(4))
    options = cpu_runtime.compiler_options()

    def compiled(impl: str):
        attend = lambda q, k, v: attention.segment_self_attention(q, k, v, segment_ids, impl)
        forward = jax.jit(attend).lower(query, key, value).compile(options)
        backward = jax.jit(lambda q, k, v, g: jax.vjp(attend, q, k, v)[1](g))
        return forward, backward.lower(query, key, value, d_out).compile(options)

    (xla_fwd, xla_bwd), (fused_fwd, fused_bwd) = compiled("xla"), compiled("fused_cpu")
    xla_f, fused_f = time_calls(
        [xla_fwd, fused_fwd], (query, key, value), warmup=args.warmup, repeats=args.repeats
    )
    xla_fb, fused_fb = time_calls(
        [xla_bwd, fused_bwd], (query, key, value, d_out), warmup=args.warmup, repeats=args.repeats
    )
    pairs = int(sum(n * n for n in workload.tokens_per_image))
    forward_flops = 4 * pairs * head_dim * workload.num_heads
    return {
        "workload": str(args.workload),
        "rows": rows,
        "seq_len": seq_len,
        "heads": workload.num_heads,
        "head_dim": head_dim,
        "scored_pairs_per_head": pairs,
        "all_pairs_per_head": rows * seq_len * seq_len,
        "xla_forward_s": xla_f,
        "fused_forward_s": fused_f,
        "xla_forward_backward_s": xla_fb,
        "fused_forward_backward_s": fused_fb,
        "forward_speedup": xla_f / fused_f,
        "forward_backward_speedup": xla_fb / fused_fb,
        "fused_forward_gflops": forward_flops / fused_f / 1e9,
        "fused_forward_backward_gflops": 3 * forward_flops / fused_fb / 1e9,
        "load_average": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        type=Path,
        default=Path(__file__).resolve().parents[3] / "shared/bench/navit_s16_train.json",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    results = run(parser.parse_args(argv))
    train_step.print_results(results)
    return results


if __name__ == "__main__":
    main()
