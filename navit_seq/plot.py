"""Learning curves as a picture: `python -m navit_seq.plot WORKDIR [WORKDIR ...] [--output PNG]`.

Reads each workdir's `metrics.jsonl` (what every trainer writes), plus the final
`eval_results.json` of `navit_seq.evaluate` when there is one, and draws three panels over
training steps: the losses (overall and per task; training solid, evaluation dashed), the
evaluation quality metrics (AP, precision@1, CIDEr, recall@k, ...), and the learning rate.
Several workdirs are overlaid, one colour each, labelled by folder name (e.g. seeds of a
recipe). Writes `WORKDIR/learning_curves.png` for one workdir unless `--output` says otherwise.
"""

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training host
import matplotlib.pyplot as plt  # noqa: E402

from navit_seq import cli  # noqa: E402

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "eval_results.json"  # navit_seq.evaluate's {"step", "metrics"}
DEFAULT_PICTURE = "learning_curves.png"
# Evaluation keys drawn as quality metrics; counts (`*_num_*`, `num_images`) are not.
QUALITY = re.compile(r"(AP\d*$|AP$|precision|accuracy|CIDEr|BLEU|recall|R@|top1|zero_shot)")


def read_metrics(workdir: str | Path) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` (one JSON object per logged step and split)."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"plot: no {METRICS_FILE} in {workdir!s}; pass a workdir that a training run "
            "(python -m navit_seq.main --workdir DIR) wrote."
        )
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                if number != len(lines):
                    raise ValueError(f"plot: {path} line {number} is not JSON.") from None
    results_path = Path(workdir) / RESULTS_FILE
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        step, metrics = results.get("step"), results.get("metrics", {})
        logged = {k for r in rows if r.get("split") == "eval" and r["step"] == step for k in r}
        extra = {k: v for k, v in metrics.items() if k not in logged}
        if isinstance(step, int) and extra:
            rows.append({"step": step, "split": "eval", **extra})
    return rows


def series(rows: Sequence[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the rows of `split` that log it (absent tasks are skipped)."""
    logged = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
    return [s for s, _ in logged], [float(v) for _, v in logged]


def _keys(rows: Sequence[dict], split: str, keep) -> list[str]:
    return sorted({k for r in rows if r.get("split") == split for k in r if keep(k)})


def _is_loss(key: str) -> bool:
    return key == "loss" or key.startswith("loss/")


def _is_quality(key: str) -> bool:
    return bool(QUALITY.search(key)) and "num_" not in key


def draw(workdirs: Sequence[str | Path], output: str | Path) -> Path:
    """Draws the learning curves of `workdirs` into the PNG `output`; returns its path."""
    runs = [(Path(w).name or str(w), read_metrics(w)) for w in workdirs]
    figure, (losses, quality, rate) = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osd^v<>p*h"
    for run_index, (name, rows) in enumerate(runs):
        colour = colours[run_index % len(colours)]
        prefix = f"{name}: " if len(runs) > 1 else ""
        loss_keys = _keys(rows, "train", _is_loss)
        for k, key in enumerate(loss_keys):
            style = dict(color=colour if len(runs) > 1 else colours[k % len(colours)])
            losses.plot(*series(rows, "train", key), label=f"{prefix}train {key}", **style)
            steps, values = series(rows, "eval", key)
            if steps:
                losses.plot(steps, values, "--o", ms=3, label=f"{prefix}eval {key}", **style)
        for k, key in enumerate(_keys(rows, "eval", _is_quality)):
            steps, values = series(rows, "eval", key)
            style = dict(color=colour if len(runs) > 1 else colours[k % len(colours)])
            quality.plot(steps, values, marker=markers[k % len(markers)], label=f"{prefix}{key}",
                         **style)  # fmt: skip
        steps, values = series(rows, "train", "learning_rate")
        if steps:
            rate.plot(steps, values, color=colour, label=name)
    losses.set(title="losses (train solid, eval dashed)", xlabel="step", ylabel="loss")
    quality.set(title="evaluation", xlabel="step", ylabel="metric")
    rate.set(title="learning rate", xlabel="step")
    for axes in (losses, quality, rate):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    if not quality.lines:
        quality.text(0.5, 0.5, "no evaluation logged", ha="center", transform=quality.transAxes)
    figure.suptitle(", ".join(str(w) for w in workdirs), fontsize=9)
    figure.tight_layout()
    output = Path(output)
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m navit_seq.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workdirs", nargs="+", help="training workdirs (with metrics.jsonl)")
    parser.add_argument(
        "--output",
        default=None,
        help=f"PNG to write (default: WORKDIR/{DEFAULT_PICTURE} for one workdir; required "
        "for several)",
    )
    cli.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.output is None and len(args.workdirs) > 1:
        parser.error("several workdirs: say where the picture goes with --output PNG.")
    output = args.output or Path(args.workdirs[0]) / DEFAULT_PICTURE
    print(f"learning curves: {draw(args.workdirs, output).resolve()}")
    return 0


if __name__ == "__main__":
    cli.run(main)
