"""Throughput of the NaViT input pipeline (grain workers + first-fit packer) on this machine.

Runs the default data config (L=256, patch 16, side ~ U(64, 256), B=32, E_max=8) for each
worker count asked for and reports packed batches/s, images/s and real tokens/s after a
warm-up batch. The source is the built bundled dataset (`--data-dir`), or synthetic images of
the sizes in a workload file (`--workload`, the images a train-step benchmark consumes).
Compare images/s with a train step's images/s (experiments/benchmarks/train_step.py).

    python experiments/benchmarks/pipeline.py --workload ../shared/bench/navit_s16_train.json
    python experiments/benchmarks/pipeline.py --data-dir datasets --workers 0,1,2

Prints one line per worker count, then one JSON line last.
"""

import argparse
import json
import os
import platform

from navit_seq import inspect, pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="built datasets (the bundled 'scenes')")
    parser.add_argument(
        "--workload",
        default="../shared/bench/navit_s16_train.json",
        help="image sizes to synthesize when --data-dir is not given",
    )
    parser.add_argument("--workers", default=None, help="comma-separated worker counts")
    parser.add_argument("--num-batches", type=int, default=40)
    args = parser.parse_args()

    config = pipeline.default_data_config()
    if args.data_dir:
        config.data_dir = args.data_dir
        source, source_name = inspect.dataset_source(config, config.train_split), config.name
    else:
        source, source_name = inspect.image_sizes_source(args.workload, config), args.workload
    worker_counts = (
        [int(w) for w in args.workers.split(",")] if args.workers else [config.num_workers]
    )
    runs = []
    for num_workers in worker_counts:
        config.num_workers = num_workers
        summary, _ = inspect.measure(source, config, train=True, num_batches=args.num_batches)
        run = {"num_workers": num_workers, **summary}
        runs.append(run)
        print(
            f"workers={num_workers}: {run['batches_per_s']:.2f} batches/s, "
            f"{run['images_per_s']:.0f} images/s, {run['real_tokens_per_s']:.0f} real tokens/s, "
            f"padding {run['padding_fraction']:.2%}, {run['images_per_seq_mean']:.2f} images/seq"
        )
    default = next(
        (r for r in runs if r["num_workers"] == pipeline.default_data_config().num_workers), runs[0]
    )
    print(
        json.dumps(
            {
                "benchmark": "pipeline",
                "source": source_name,
                "batch_size": config.batch_size,
                "seq_len": config.seq_len,
                "patch_size": config.patch_size,
                "cpu_count": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "num_workers": default["num_workers"],
                "batches_per_s": default["batches_per_s"],
                "images_per_s": default["images_per_s"],
                "real_tokens_per_s": default["real_tokens_per_s"],
                "padding_fraction": default["padding_fraction"],
                "images_per_seq_mean": default["images_per_seq_mean"],
                "by_workers": {
                    r["num_workers"]: {
                        k: r[k] for k in ("batches_per_s", "images_per_s", "real_tokens_per_s")
                    }
                    for r in runs
                },
            }
        )
    )


if __name__ == "__main__":
    main()
