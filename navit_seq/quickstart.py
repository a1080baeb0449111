"""`make quickstart`: build the bundled scene dataset, train the quickstart recipe on CPU,
evaluate it, and say where everything went.

Each stage is the same command a user would type (printed before it runs), so the quickstart
doubles as a worked example of the command line.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


# A smaller build than the default 10k scenes: enough for the CPU recipe, built in well under a
# minute on 2 cores. Always the same options, so a second quickstart reuses the build.
QUICKSTART_SCENES = ["--train-size", "4000", "--validation-size", "500", "--heldout-size", "500"]


def run_stage(title: str, argv: list[str]) -> None:
    """Runs one command-line stage in a fresh process and stops the quickstart if it fails."""
    print(f"\n=== {title}\n$ {' '.join(argv)}", flush=True)
    started = time.time()
    result = subprocess.run([sys.executable, *argv[1:]] if argv[0] == "python" else argv)
    if result.returncode != 0:
        sys.exit(f"quickstart: stage '{title}' failed with exit code {result.returncode}.")
    print(f"--- {title}: done in {time.time() - started:.0f} s", flush=True)


def summarize(workdir: Path) -> None:
    """Prints the last training metrics and the evaluation results."""
    metrics_path = workdir / "metrics.jsonl"
    if metrics_path.exists():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        train = [r for r in rows if r.get("split") == "train"]
        if train:
            first, last = train[0], train[-1]
            print(f"train loss: step {first['step']}: {first['loss']:.4f} -> "
                  f"step {last['step']}: {last['loss']:.4f}")
    results_path = workdir / "eval_results.json"
    if results_path.exists():
        print(f"evaluation ({results_path}):")
        print(json.dumps(json.loads(results_path.read_text()), indent=2, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="datasets", help="where datasets are built")
    parser.add_argument("--workdir", default="workdirs/quickstart", help="training outputs")
    parser.add_argument("--config", default="configs/quickstart.py", help="the recipe")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    workdir = Path(args.workdir)

    run_stage(
        "build the bundled scene dataset (skipped when already built)",
        ["python", "-m", "navit_seq.data.build", "scenes", "--data-dir", args.data_dir,
         *QUICKSTART_SCENES, "--show", "4"],
    )  # fmt: skip
    run_stage(
        "train the quickstart recipe on CPU",
        ["python", "-m", "navit_seq.main", "--config", args.config, "--workdir", args.workdir,
         f"--config.data.data_dir={args.data_dir}"],
    )  # fmt: skip
    run_stage(
        "evaluate the final checkpoint",
        ["python", "-m", "navit_seq.evaluate", "--config", args.config, "--workdir", args.workdir,
         f"--config.data.data_dir={args.data_dir}"],
    )  # fmt: skip

    print("\n=== quickstart summary")
    summarize(workdir)
    print(f"dataset:         {Path(args.data_dir).resolve()}")
    print(f"sample picture:  {Path(args.data_dir).resolve() / 'scenes_train_samples.png'}")
    print(f"workdir:         {workdir.resolve()} (metrics.jsonl, TensorBoard events, checkpoints)")


if __name__ == "__main__":
    main()
