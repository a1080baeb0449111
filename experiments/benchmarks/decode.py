"""Decoding speed of Pix2Seq rows: KV cache vs recomputation, and early stopping.

Workload (the detection sequence length): one row per image, prompt [det], up to 100 objects
x 5 tokens = 500 generated tokens (decoder positions 512), vocabulary of 80 classes and 1000
coordinate bins; NaViT encoder over packed images, Pix2Seq's "S" decoder (6 x 512) by default.
Measured, each the median of `--repeats` jitted runs after a compile run:
- tokens_per_s_cached: greedy, KV cache, all `max_len` steps (no early stop);
- tokens_per_s_recompute: greedy, whole prefix recomputed every step. Every such step runs the
  decoder over all P + max_len positions (static shapes), so each step costs the same and
  `--recompute_steps` steps (rows forced to end there) give its rate;
- early_stop_speedup: rows that end early, like images with few objects: each row's object
  count is drawn from a geometric distribution with COCO's mean of 7.3 objects per image
  (capped at 100) and the row is forced to END after 5 tokens per object; time to decode
  every step to max_len (Pix2Seq's reference behaviour) / time with early stop (same tokens,
  checked).

    python experiments/benchmarks/decode.py            # CPU-sized defaults
    python experiments/benchmarks/decode.py --batch 16 --repeats 5   # an accelerator

Prints one line per figure, then one JSON line of results last.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from navit_seq.decode import DecodeConfig, TokenMask, generate
from navit_seq.models.pix2seq import Pix2Seq, default_pix2seq_config
from navit_seq.tasks.vocab import END, Vocab

COCO_MEAN_OBJECTS = 7.3  # instances per image in COCO train2017
TOKENS_PER_OBJECT = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--encoder", default="Ti", help="NaViT preset of the encoder")
    parser.add_argument("--decoder", default="S", help="decoder preset (S = Pix2Seq's)")
    parser.add_argument("--batch", type=int, default=2, help="packed rows B")
    parser.add_argument("--images_per_row", type=int, default=2, help="images (and rows) per B")
    parser.add_argument("--image_side", type=int, default=16, help="image side in patches")
    parser.add_argument("--max_objects", type=int, default=100, help="objects per row at most")
    parser.add_argument("--recompute_steps", type=int, default=4, help="steps timed, recompute")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Pix2Seq, dict[str, np.ndarray], np.ndarray, int]:
    """(model, packed batch with row_slot, prompt [B, R, 1], max_len)."""
    vocab = Vocab(num_classes=80, num_bins=1000)
    max_len = TOKENS_PER_OBJECT * args.max_objects
    config = default_pix2seq_config()
    config.update(dict(variant=args.encoder, patch_size=16))
    config.decoder.update(dict(variant=args.decoder, vocab_size=vocab.size))
    config.decoder.max_len = max(config.decoder.max_len, max_len + 1)
    model = Pix2Seq(config, rngs=nnx.Rngs(args.seed))

    side, images = args.image_side, args.images_per_row
    tokens_per_image = side * side
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, images * tokens_per_image)
    batch = {
        "patches": rng.integers(0, 256, (*shape, 16 * 16 * 3), dtype=np.uint8),
        "segment_ids": np.repeat(np.arange(1, images + 1, dtype=np.int32), tokens_per_image)[
            None
        ].repeat(args.batch, 0),
        "patch_coords": np.tile(grid.reshape(-1, 2), (args.batch, images, 1)).astype(np.int32),
        "image_grid": np.full((args.batch, images, 2), side, np.int32),
        "example_valid": np.ones((args.batch, images), bool),
        "row_slot": np.tile(np.arange(images, dtype=np.int32), (args.batch, 1)),  # [B, R]
    }
    prompt = np.full((args.batch, images, 1), Vocab.DETECTION_PROMPT, np.int32)
    return model, batch, prompt, max_len


def end_after(stop_steps: np.ndarray, vocab_size: int) -> TokenMask:
    """Token mask forcing row r to END at step stop_steps[r] and not before (prompt length 1)."""
    stop_steps = jnp.asarray(stop_steps)  # [B, R]
    is_end = jnp.arange(vocab_size) == END

    def mask(tokens: jax.Array, position: jax.Array) -> jax.Array:
        del tokens
        return jnp.where((position - 1 >= stop_steps)[..., None], is_end, ~is_end)  # [B, R, V]

    return mask


def timed(label: str, fn: Callable[[], dict[str, jax.Array]], repeats: int) -> tuple[float, dict]:
    """Median seconds of `repeats` calls after one compile-and-run call, and the last output."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    print(f"{label}: compile + first run {time.perf_counter() - start:.1f} s", file=sys.stderr)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    model, batch, prompt, max_len = build(args)
    rows = prompt.shape[0] * prompt.shape[1]
    vocab_size = model.decoder.vocab_size
    key = jax.random.key(args.seed)
    decode = lambda config, mask=None: lambda: generate(model, batch, prompt, key, config, mask)

    full = DecodeConfig(max_len=max_len, early_stop=False)
    cached_s, _ = timed("cached", decode(full), args.repeats)

    recompute_mask = end_after(np.full(prompt.shape[:2], args.recompute_steps - 1), vocab_size)
    recompute = DecodeConfig(max_len=max_len, use_cache=False)
    recompute_s, out = timed("recompute", decode(recompute, recompute_mask), args.repeats)
    assert int(out["num_steps"]) == args.recompute_steps

    rng = np.random.default_rng(args.seed)
    objects = np.minimum(rng.geometric(1 / COCO_MEAN_OBJECTS, prompt.shape[:2]), args.max_objects)
    stop_mask = end_after(TOKENS_PER_OBJECT * objects, vocab_size)
    stop_full_s, stop_full = timed("full length", decode(full, stop_mask), args.repeats)
    early = DecodeConfig(max_len=max_len, early_stop=True)
    stop_early_s, stop_early = timed("early stop", decode(early, stop_mask), args.repeats)
    np.testing.assert_array_equal(stop_full["tokens"], stop_early["tokens"])

    return {
        "tokens_per_s_cached": rows * max_len / cached_s,
        "tokens_per_s_recompute": rows * args.recompute_steps / recompute_s,
        "cache_speedup": (recompute_s / args.recompute_steps) / (cached_s / max_len),
        "early_stop_speedup": stop_full_s / stop_early_s,
        "decode_s_cached": cached_s,
        "decode_s_recompute": recompute_s,
        "decode_s_full_length": stop_full_s,
        "decode_s_early_stop": stop_early_s,
        "steps_early_stop": int(stop_early["num_steps"]),
        "objects_per_row_mean": float(objects.mean()),
        "objects_per_row_max": int(objects.max()),
        "rows": rows,
        "max_len": max_len,
        "prompt_len": prompt.shape[-1],
        "recompute_steps": args.recompute_steps,
        "encoder_tokens": int(batch["segment_ids"].size),
        "encoder": args.encoder,
        "decoder": args.decoder,
        "vocab_size": vocab_size,
        "repeats": args.repeats,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    results = run(parse_args(argv))
    for key, value in results.items():
        print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
