"""`make quickstart`: build the bundled easy scenes (`scenes_easy`: 1-3 large objects on plain
backgrounds), train the Pix2Seq recipe on CPU in two stages (detection alone, then detection,
segmentation, keypoints and captioning from that checkpoint, as Pix2Seq v2 fine-tunes a
detection model), evaluate it with COCO AP and caption scores, and say where everything went.

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

from navit_seq import cli

# 16k training scenes, built in ~75 s on 2 cores: stage 1 sees each ~7 times, not ~27 (4k
# scenes: bbox AP50 0.039 at 1000 steps, 16k: 0.063; 100 validation images, README). Always
# the same options, so a second quickstart reuses the build.
QUICKSTART_SCENES = ["--train-size", "16000", "--validation-size", "500", "--heldout-size", "500"]
QUICKSTART_DATA = "scenes_easy"  # the scene variant (data.build --variant, the recipe's `data`)
# Steps of the two training stages: detection alone, then all four tasks (about 10 and 5
# minutes on 2 cores; README).
DETECTION_STEPS, ALL_TASKS_STEPS = 1000, 300


def run_stage(title: str, argv: list[str]) -> None:
    """Runs one command-line stage in a fresh process and stops the quickstart if it fails."""
    print(f"\n=== {title}\n$ {' '.join(argv)}", flush=True)
    started = time.time()
    result = subprocess.run([sys.executable, *argv[1:]] if argv[0] == "python" else argv)
    if result.returncode != 0:
        sys.exit(
            f"error: quickstart stage '{title}' failed with exit code {result.returncode} (its "
            "message is above); fix that and run the quickstart again: finished stages are kept."
        )
    print(f"--- {title}: done in {time.time() - started:.0f} s", flush=True)


def summarize(workdir: Path) -> None:
    """Prints each training loss (overall and per task) at its first and last logged step, and
    the evaluation results."""
    metrics_path = workdir / "metrics.jsonl"
    if metrics_path.exists():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        train = [r for r in rows if r.get("split") == "train"]
        losses = sorted({k for r in train for k in r if k == "loss" or k.startswith("loss/")})
        for key in losses:
            # A task absent from a logging window (batch mixing) is not in its row.
            logged = [(r["step"], r[key]) for r in train if key in r]
            if logged:
                (first_step, first), (last_step, last) = logged[0], logged[-1]
                print(f"train {key:20s} step {first_step:4d}: {first:.3f} -> "
                      f"step {last_step:4d}: {last:.3f}")  # fmt: skip
    results_path = workdir / "eval_results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
        metrics = results.get("metrics", results)
        shown = ("bbox_AP", "bbox_AP50", "segm_AP", "keypoints_AP", "caption_BLEU4",
                 "caption_CIDEr", "loss")  # fmt: skip
        print(
            f"evaluation on {results.get('split', '?')} at step {results.get('step', '?')} "
            f"({results_path}):"
        )
        for key in shown:
            if key in metrics:
                print(f"  {key:14s} {metrics[key]:.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m navit_seq.quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", default="datasets", help="where datasets are built "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--workdir", default="workdirs/quickstart", help="training outputs "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--config",
        default="configs/pix2seq_scenes.py",
        help="the recipe; it takes the arguments steps, data and tasks (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the seed of both stages' "
                        "parameters and data order (a second seed checks a figure; default: "
                        "%(default)s)")  # fmt: skip
    cli.add_verbose_argument(parser)
    cli.add_quiet_argument(parser)
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[cli.DEBUG_ENV] = "1"  # the stages print their tracebacks too
    workdir = Path(args.workdir)

    detection_workdir = workdir / "detection"
    recipe = f"{args.config}:data={QUICKSTART_DATA}"
    data_dir = f"--config.data.data_dir={args.data_dir}"
    # Only a seed other than the recipe's is passed on, so the default commands stay short.
    seeds = [f"--config.seed={args.seed}", f"--config.data.seed={args.seed}"] if args.seed else []
    run_stage(
        "build the bundled easy scenes (skipped when already built)",
        ["python", "-m", "navit_seq.data.build", "scenes", "--variant", QUICKSTART_DATA,
         "--data-dir", args.data_dir, *QUICKSTART_SCENES, "--show", "4"],
    )  # fmt: skip
    run_stage(
        "stage 1: train detection alone on CPU",
        ["python", "-m", "navit_seq.main", "--config",
         f"{recipe},tasks=detection,steps={DETECTION_STEPS}", "--workdir",
         str(detection_workdir), data_dir, "--config.evaluation.every_steps=-1", *seeds],
    )  # fmt: skip
    run_stage(
        "stage 2: train all four tasks from the detection checkpoint",
        # The whole-split evaluation runs once, in the next stage, not also at the last step.
        # A third of stage 1's learning rate: at 3e-3 the new tasks' first gradients undo the
        # detector (100 validation images after stage 2: bbox AP50 0.011 at 3e-3, 0.041 at 1e-3,
        # stage 1 alone 0.039; one seed, README).
        ["python", "-m", "navit_seq.main", "--config", f"{recipe},steps={ALL_TASKS_STEPS}",
         "--workdir", args.workdir, data_dir, f"--config.init_from={detection_workdir}",
         "--config.evaluation.every_steps=-1", "--config.optimizer.learning_rate=0.001", *seeds],
    )  # fmt: skip
    run_stage(
        "evaluate the final checkpoint on all 500 validation images (COCO AP, caption "
        "scores, a picture grid)",
        ["python", "-m", "navit_seq.evaluate", "--config", recipe, "--workdir", args.workdir,
         data_dir, "--config.evaluation.num_images=0"],
    )  # fmt: skip
    run_stage(
        "draw the learning curves of both stages",
        [
            "python",
            "-m",
            "navit_seq.plot",
            str(detection_workdir),
            args.workdir,
            "--output",
            str(workdir / "learning_curves.png"),
        ],
    )
    print("\n=== quickstart summary")
    print("stage 1 (detection alone):")
    summarize(detection_workdir)
    print("stage 2 (all four tasks):")
    summarize(workdir)
    print(f"dataset:         {Path(args.data_dir).resolve()}")
    samples = f"{QUICKSTART_DATA}_train_samples.png"
    print(f"sample picture:  {Path(args.data_dir).resolve() / samples}")
    print(f"predictions:     {(workdir / 'eval_predictions.png').resolve()} (next to ground truth)")
    print(f"learning curves: {(workdir / 'learning_curves.png').resolve()}")
    print(f"workdir:         {workdir.resolve()} (metrics.jsonl, TensorBoard events, checkpoints)")


if __name__ == "__main__":
    cli.run(main)
