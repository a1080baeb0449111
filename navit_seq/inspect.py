"""`python -m navit_seq.inspect`: packing statistics of a data config, and a picture.

Runs the input pipeline of a config (a recipe with `.data`, or a data config; default:
`navit_seq/pipeline.py`) for some batches and prints padding fraction, images per sequence,
resized / dropped examples, dropped tokens and the pipeline's batches/s, then one JSON line.
It saves a picture of a few packed rows, each patch tinted by its image (segment).

    python -m navit_seq.inspect --config configs/quickstart.py --num-batches 50
    python -m navit_seq.inspect --image-sizes /work/shared/bench/navit_s16_train.json \\
        --config.resolution.kind=native

`--image-sizes FILE` (a JSON with "images": [[height, width], ...], like the shared benchmark
workloads) packs synthetic images of those stored sizes instead of reading a dataset.
"""

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from absl import flags

from navit_seq import cli, config_utils, pipeline
from navit_seq.data import packing

# Raw counters already summarized by `packing.summarize_stats`.
_DERIVED_FROM = (
    "tokens_real",
    "tokens_total",
    "rows_nonempty",
    "images_per_seq_min",
    "images_per_seq_max",
    "tokens_before_drop",
)


class SyntheticImages(Sequence):
    """Decoded examples with images of given (height, width): smooth gradients, one label."""

    def __init__(self, sizes: Sequence[Sequence[int]]):
        self.sizes = [(int(h), int(w)) for h, w in sizes]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> dict:
        height, width = self.sizes[index]
        y, x = np.mgrid[0:height, 0:width]
        hue = (index * 0.618) % 1.0  # a different colour per image
        image = np.stack(
            [255 * y / max(height, 1), 255 * x / max(width, 1), np.full_like(y, 255 * hue)], -1
        ).astype(np.uint8)  # [H, W, 3]
        return {"image": image, "objects": {"label": np.zeros((1,), np.int64)}}


def image_sizes_source(path: str, config: ml_collections.ConfigDict) -> SyntheticImages:
    """Synthetic source from a workload file; single-class classification targets."""
    workload = json.loads(Path(path).read_text())
    if "images" not in workload:
        raise ValueError(f"--image-sizes {path}: no 'images' list of [height, width] pairs.")
    config.task.num_classes = max(config.task.num_classes, 1)
    return SyntheticImages(workload["images"])


def dataset_source(config: ml_collections.ConfigDict, split: str) -> Sequence[dict]:
    """The decoded examples of `config.name` / `split` under `config.data_dir`."""
    from navit_seq.data import sources  # imports TensorFlow Datasets: only when a dataset is read

    source = sources.data_source(config.name, split, data_dir=config.data_dir)
    if "num_classes" in config.task and not config.task.num_classes:
        config.task.num_classes = len(sources.class_names(config.name, data_dir=config.data_dir))
    return source


def draw_rows(batch: dict, patch_size: int, num_rows: int, path: Path) -> None:
    """Each row's L tokens as a square grid of patches, tinted by segment; padding is black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq_len = batch["segment_ids"].shape[1]
    side = int(np.ceil(np.sqrt(seq_len)))
    colours = plt.get_cmap("tab10")(np.arange(10))[:, :3]
    num_rows = min(num_rows, batch["segment_ids"].shape[0])
    fig, axes = plt.subplots(1, num_rows, figsize=(3.2 * num_rows, 3.6), squeeze=False)
    for row, ax in zip(range(num_rows), axes[0], strict=True):
        tokens = batch["patches"][row].reshape(seq_len, patch_size, patch_size, 3) / 255.0
        segment_ids = batch["segment_ids"][row]
        tint = colours[(segment_ids - 1) % 10][:, None, None, :]  # [L, 1, 1, 3]
        tokens = np.where(segment_ids[:, None, None, None] > 0, 0.35 * tokens + 0.65 * tint, 0.0)
        canvas = np.zeros((side * side, patch_size, patch_size, 3))
        canvas[:seq_len] = tokens
        canvas = canvas.reshape(side, side, patch_size, patch_size, 3).transpose(0, 2, 1, 3, 4)
        ax.imshow(canvas.reshape(side * patch_size, side * patch_size, 3))
        padding = float(np.mean(segment_ids == 0))
        ax.set_title(f"row {row}: {segment_ids.max()} images, {padding:.1%} padding", fontsize=9)
        ax.axis("off")
    fig.suptitle("Packed sequences (token order, row-major); colour = image, black = padding")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def measure(
    source: Sequence[dict], config: ml_collections.ConfigDict, *, train: bool, num_batches: int
) -> tuple[dict, dict]:
    """Run the pipeline for a warm-up batch plus `num_batches`; (summary, first measured batch)."""
    iterator = iter(pipeline.make_dataset(source, config, train=train))
    try:
        next(iterator)  # warm-up: starts the workers, excluded from the rate
        start_stats, start = dict(iterator.stats), time.perf_counter()
        first, measured = None, 0
        for batch in iterator:
            first = first if first is not None else batch
            measured += 1
            if measured == num_batches:
                break
        seconds = time.perf_counter() - start
    finally:
        iterator.close()
    stats = iterator.stats
    window = {key: stats[key] - start_stats[key] for key in ("examples_packed", "tokens_real")}
    summary = {
        **packing.summarize_stats(stats),
        "examples_resized": stats["examples_resized"],
        "examples_dropped": stats["examples_read"]
        - stats["examples_packed"]
        - iterator.num_buffered,
        # Every other counter: batches, examples, dropped tokens, conversions, task counts.
        **{key: value for key, value in stats.items() if key not in _DERIVED_FROM},
        "batches_per_s": measured / seconds,
        "images_per_s": window["examples_packed"] / seconds,
        "real_tokens_per_s": window["tokens_real"] / seconds,
    }
    return summary, first


def main(argv: Sequence[str]) -> None:
    del argv
    options = flags.FLAGS
    config = options.config
    config = config.data if "data" in config else config
    if options["image-sizes"].value:
        source, source_name = (
            image_sizes_source(options["image-sizes"].value, config),
            options["image-sizes"].value,
        )
    else:
        split = config.eval_split if options.eval else config.train_split
        source, source_name = dataset_source(config, split), f"{config.name}/{split}"
    summary, first = measure(
        source, config, train=not options.eval, num_batches=options["num-batches"].value
    )
    picture = Path(options.output)
    if first is not None:
        draw_rows(first, config.patch_size, options["rows-shown"].value, picture)
    mode = "eval" if options.eval else "train"
    resolution_kind = (
        pipeline.eval_resolution_config(config).kind if options.eval else config.resolution.kind
    )
    print(f"source: {source_name} ({len(source)} examples), mode: {mode}")
    print(
        f"L={config.seq_len} B={config.batch_size} E_max={config.max_examples_per_seq} "
        f"patch={config.patch_size} resolution={resolution_kind} "
        f"token_drop={config.token_drop.kind} workers={config.num_workers}"
    )
    for key, value in summary.items():
        print(f"  {key:24s} {value:.4g}" if isinstance(value, float) else f"  {key:24s} {value}")
    print(f"picture: {picture.resolve()}")
    result = {
        "source": source_name,
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
        "patch_size": config.patch_size,
        "max_examples_per_seq": config.max_examples_per_seq,
        "resolution": resolution_kind,
        "num_workers": config.num_workers,
        **summary,
    }
    print(json.dumps(result))
    sys.stdout.flush()


def define_flags() -> None:
    """Defined only when run as a command, so importing this module (tests, notebooks) never
    clashes with the training commands' absl flags of the same names. `--config` is theirs
    (recipes import config_utils, which defines it), defaulting here to the data config."""
    flags.FLAGS.set_default("config", str(Path(pipeline.__file__)))
    for name in ("config", "verbose"):  # absl's --help lists only the command's key flags
        flags.declare_key_flag(name)
    flags.DEFINE_string(
        "image-sizes", None, "JSON file with 'images': [[h, w], ...]; packs synthetic images."
    )
    flags.DEFINE_integer("num-batches", 50, "Batches to measure (after a warm-up one).")
    flags.DEFINE_bool("eval", False, "Inspect the evaluation pipeline (token budget, no drop).")
    flags.DEFINE_string("output", "outputs/inspect/packing.png", "Where the picture goes.")
    flags.DEFINE_integer("rows-shown", 4, "Packed rows drawn in the picture.")


if __name__ == "__main__":
    define_flags()
    cli.run_absl(main, flags_parser=config_utils.parse_flags)
