"""Run a paper ablation: `python -m navit_seq.experiment experiments/<paper>/<name>.py`.

An ablation is a Python file next to its results that names (upper-case module attributes):
- `RECIPE`: the base recipe, `configs/<recipe>.py[:arg]`;
- `ARMS`: {arm name: {dotted config key: value}}, the overrides that make each arm;
- `SEEDS`: the seeds (`config.seed` and `config.data.seed`), at least 3 for a verdict;
- `METRICS`: the result keys tabulated (e.g. `precision_at_1`, `bbox_AP`);
- `COMPUTE`: one sentence saying how the arms are held at equal training compute;
- `PAPER`: {arm or "" (the whole ablation): the paper's figure, as text};
optional:
- `COMMON`: overrides for every arm (e.g. the step budget);
- `EVALUATIONS`: {name: overrides}: each final checkpoint is evaluated once per entry
  (e.g. per test resolution; default one plain evaluation named "eval");
- `CURVE`: a metric of the in-training evaluations (`eval_every_steps`) tabulated and
  plotted against the training compute spent when it was measured (tokens processed,
  padding included), for claims of the kind "reaches the baseline's accuracy with less compute";
- `verdict(table) -> str`: the reading of the aggregated table (see `aggregate`).

Each (arm, seed) is the ordinary training command into its own workdir
`ROOT/<ablation>/<arm>/seed<k>`, then `navit_seq.evaluate` once per evaluation into
`eval_<name>.json` there. A finished stage leaves its output and is skipped next time, so a
killed sweep resumes (an unfinished training run resumes from its checkpoint). Runs are
sequential here; `--print-commands` prints them instead, for a cluster scheduler (no job
scheduler of our own). `--aggregate` only reads what finished. The table (mean ± std over
seeds and every seed's value, with the images, real tokens and processed tokens trained on) goes to
`<ablation dir>/results/<ablation>.md` and `.json`, a plot to `.png`.
"""

import argparse
import importlib.util
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navit_seq import cli

TRAIN_DONE = "experiment_train_done.json"  # written by the runner after training succeeds
DEFAULT_EVALUATIONS = {"eval": {}}


@dataclass(frozen=True)
class Ablation:
    """What an ablation file defines (see the module docstring)."""

    name: str
    path: Path
    recipe: str
    arms: Mapping[str, Mapping[str, Any]]
    seeds: Sequence[int]
    metrics: Sequence[str]
    compute: str
    paper: Mapping[str, str]
    common: Mapping[str, Any] = field(default_factory=dict)
    evaluations: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: DEFAULT_EVALUATIONS
    )
    curve: str | None = None
    verdict: Callable[[dict], str] | None = None


def load_ablation(path: str | Path) -> Ablation:
    """The ablation defined by the Python file `path`, with its fields checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment: no ablation file {str(path)!r}; see experiments/.")
    spec = importlib.util.spec_from_file_location(f"ablation_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    required = ("RECIPE", "ARMS", "SEEDS", "METRICS", "COMPUTE", "PAPER")
    missing = [name for name in required if not hasattr(module, name)]
    if missing:
        raise ValueError(f"experiment: {path} lacks {missing}; the module docstring lists them.")
    ablation = Ablation(
        name=path.stem,
        path=path,
        recipe=module.RECIPE,
        arms=module.ARMS,
        seeds=tuple(module.SEEDS),
        metrics=tuple(module.METRICS),
        compute=module.COMPUTE,
        paper=module.PAPER,
        common=getattr(module, "COMMON", {}),
        evaluations=getattr(module, "EVALUATIONS", DEFAULT_EVALUATIONS),
        curve=getattr(module, "CURVE", None),
        verdict=getattr(module, "verdict", None),
    )
    if not ablation.arms or not ablation.seeds or not ablation.metrics:
        raise ValueError(f"experiment: {path} has no arms, seeds or metrics; give at least one.")
    return ablation


def _flag(key: str, value: Any) -> str:
    """`--config.<key>=<value>` as ml_collections' flag parser reads it."""
    text = repr(value) if isinstance(value, tuple | list) else str(value)
    return f"--config.{key}={text}"


def workdir_of(root: Path, ablation: Ablation, arm: str, seed: int) -> Path:
    return root / ablation.name / arm / f"seed{seed}"


@dataclass(frozen=True)
class Stage:
    """One command of the sweep and the file that says it finished."""

    arm: str
    seed: int
    kind: str  # "train" or the evaluation's name
    argv: tuple[str, ...]
    done_file: Path


def stages(ablation: Ablation, root: Path, python: str = sys.executable) -> list[Stage]:
    """Every command of the sweep in order: per (arm, seed), training then each evaluation."""
    out = []
    for arm, overrides in ablation.arms.items():
        for seed in ablation.seeds:
            workdir = workdir_of(root, ablation, arm, seed)
            settings = {**ablation.common, **overrides, "seed": seed, "data.seed": seed}
            config = ["--config", ablation.recipe, "--workdir", str(workdir)]
            flags = [_flag(k, v) for k, v in settings.items()]
            train = (python, "-m", "navit_seq.main", *config, *flags)
            out.append(Stage(arm, seed, "train", train, workdir / TRAIN_DONE))
            for name, evaluation in ablation.evaluations.items():
                results = f"eval_{name}.json"
                eval_flags = [_flag(k, v) for k, v in evaluation.items()]
                argv = (python, "-m", "navit_seq.evaluate", *config, *flags, *eval_flags,
                        f"--results_file={results}")  # fmt: skip
                out.append(Stage(arm, seed, name, argv, workdir / results))
    return out


def run_stages(
    todo: Sequence[Stage], execute: Callable[[Sequence[str]], int] | None = None
) -> list[Stage]:
    """Runs the stages whose done file is missing, in order; returns those that ran. A failed
    command stops the sweep with its exit code (what finished stays finished)."""
    execute = execute or (lambda argv: subprocess.run(list(argv)).returncode)
    ran = []
    for stage in todo:
        if stage.done_file.exists():
            continue
        print(f"\n=== {stage.arm} seed {stage.seed}: {stage.kind}\n$ {shlex.join(stage.argv)}",
              flush=True)  # fmt: skip
        started = time.time()
        code = execute(stage.argv)
        if code != 0:
            raise RuntimeError(
                f"experiment: {stage.arm} seed {stage.seed} {stage.kind} failed with exit code "
                f"{code} (its output is above); fix it and run again: finished runs are kept."
            )
        if stage.kind == "train":
            record = {"argv": list(stage.argv), "seconds": round(time.time() - started, 1)}
            stage.done_file.write_text(json.dumps(record, indent=1) + "\n")
        elif not stage.done_file.exists():
            raise RuntimeError(f"experiment: {shlex.join(stage.argv)} wrote no {stage.done_file}.")
        ran.append(stage)
    return ran


def _metrics_rows(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _compute_until(train_rows: Sequence[Mapping[str, Any]], step: int) -> dict[str, float]:
    """Images, real tokens and processed tokens (padding included: the compute) trained on in
    the first `step` steps: each logged window's per-step means times the window's steps up
    to `step`. The loop logs real tokens (`tokens_per_step`) and `padding_fraction`."""
    seen = {"images_seen": 0.0, "tokens_seen": 0.0, "tokens_processed": 0.0}
    previous = 0
    for row in train_rows:
        steps = min(row["step"], step) - previous
        if steps <= 0:
            break
        real = row.get("tokens_per_step", 0.0)
        seen["images_seen"] += steps * row.get("images_per_step", 0.0)
        seen["tokens_seen"] += steps * real
        seen["tokens_processed"] += steps * real / (1.0 - row.get("padding_fraction", 0.0))
        previous = row["step"]
    return seen


def training_compute(workdir: Path) -> dict[str, float]:
    """Steps, images, real and processed tokens trained on, from the run's metrics.jsonl."""
    train = [r for r in _metrics_rows(workdir) if r.get("split") == "train"]
    last = train[-1]["step"] if train else 0
    done = (workdir / TRAIN_DONE).read_text().strip()  # empty when a scheduler touched it
    seconds = json.loads(done)["seconds"] if done else float("nan")
    return {"steps": last, **_compute_until(train, last), "train_s": seconds}


def training_curve(workdir: Path, metric: str) -> dict[int, dict[str, float]]:
    """{step: {"value", "images_seen", "tokens_seen", "tokens_processed"}} for each
    in-training evaluation of `metric` (the rows with split "eval"), with the compute spent up
    to that step."""
    rows = _metrics_rows(workdir)
    train = [r for r in rows if r.get("split") == "train"]
    return {
        row["step"]: {"value": float(row[metric]), **_compute_until(train, row["step"])}
        for row in rows
        if row.get("split") == "eval" and metric in row
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(ablation: Ablation, root: Path) -> dict[str, Any]:
    """{"arms": {arm: {"<evaluation>/<metric>" or compute key: {"mean", "std", "seeds": {seed:
    value}}}}} over the finished runs (std: sample standard deviation over seeds)."""
    table: dict[str, Any] = {}
    for arm in ablation.arms:
        per_key: dict[str, dict[int, float]] = {}
        for seed in ablation.seeds:
            workdir = workdir_of(root, ablation, arm, seed)
            if not (workdir / TRAIN_DONE).exists():
                continue
            for key, value in training_compute(workdir).items():
                per_key.setdefault(key, {})[seed] = value
            for name in ablation.evaluations:
                path = workdir / f"eval_{name}.json"
                if not path.exists():
                    continue
                metrics = json.loads(path.read_text())["metrics"]
                for metric in ablation.metrics:
                    if metric in metrics:
                        per_key.setdefault(f"{name}/{metric}", {})[seed] = float(metrics[metric])
        table[arm] = {key: _summary(seeds) for key, seeds in per_key.items()}
    out = {"ablation": ablation.name, "recipe": ablation.recipe, "arms": table}
    if ablation.curve:
        out["curves"] = {arm: _curve_summary(ablation, root, arm) for arm in ablation.arms}
    return out


def _summary(seeds: Mapping[int, float]) -> dict[str, Any]:
    mean, std = _mean_std(list(seeds.values()))
    return {"mean": mean, "std": std, "seeds": dict(seeds)}


def _curve_summary(ablation: Ablation, root: Path, arm: str) -> dict[int, dict[str, Any]]:
    """{step: mean ± std of CURVE over the finished seeds, with the mean compute spent}."""
    per_step: dict[int, dict[int, dict[str, float]]] = {}
    for seed in ablation.seeds:
        workdir = workdir_of(root, ablation, arm, seed)
        if (workdir / TRAIN_DONE).exists():
            for step, point in training_curve(workdir, ablation.curve).items():
                per_step.setdefault(step, {})[seed] = point
    curve = {}
    for step, points in sorted(per_step.items()):
        summary = _summary({seed: p["value"] for seed, p in points.items()})
        for key in ("images_seen", "tokens_seen", "tokens_processed"):
            summary[key] = sum(p[key] for p in points.values()) / len(points)
        curve[step] = summary
    return curve


def markdown(ablation: Ablation, table: Mapping[str, Any]) -> str:
    """The aggregated table as Markdown: one row per arm, mean ± std (n seeds) per column,
    then every seed's value, the compute statement, the paper's figures and the verdict."""
    keys = [f"{e}/{m}" for e in ablation.evaluations for m in ablation.metrics]
    compute_keys = ("steps", "images_seen", "tokens_seen", "tokens_processed", "train_s")
    lines = [
        f"# {ablation.name}",
        "",
        f"Recipe `{ablation.recipe}`; seeds {list(ablation.seeds)}; "
        f"`python -m navit_seq.experiment {ablation.path}`.",
        "",
        f"**Equal compute:** {ablation.compute}",
        "",
        "| arm | " + " | ".join(keys + list(compute_keys)) + " | paper |",
        "|" + "---|" * (len(keys) + len(compute_keys) + 2),
    ]
    for arm, row in table["arms"].items():
        cells = []
        for key in keys + list(compute_keys):
            if key not in row:
                cells.append("–")
                continue
            mean, std, n = row[key]["mean"], row[key]["std"], len(row[key]["seeds"])
            if key in compute_keys:
                cells.append(f"{mean:.4g}")
            else:
                cells.append(f"{mean:.3f} ± {std:.3f} (n={n})" if n > 1 else f"{mean:.3f} (n=1)")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {ablation.paper.get(arm, '')} |")
    lines += ["", "Every seed:", ""]
    for arm, row in table["arms"].items():
        for key in keys:
            if key in row:
                seeds = ", ".join(f"{s}: {v:.3f}" for s, v in row[key]["seeds"].items())
                lines.append(f"- {arm} {key}: {seeds}")
    if ablation.curve:
        lines += _curve_markdown(ablation, table["curves"])
    if "" in ablation.paper:
        lines += ["", f"**Paper:** {ablation.paper['']}"]
    if ablation.verdict is not None:
        lines += ["", f"**Verdict:** {ablation.verdict(table)}"]
    return "\n".join(lines) + "\n"


def _curve_markdown(ablation: Ablation, curves: Mapping[str, Mapping[int, Any]]) -> list[str]:
    """The in-training evaluations: one row per step, per arm mean ± std and tokens spent."""
    arms = list(curves)
    lines = [
        "",
        f"{ablation.curve} during training (mean ± std over seeds @ tokens processed, "
        "padding included):",
        "",
        "| step | " + " | ".join(arms) + " |",
        "|" + "---|" * (len(arms) + 1),
    ]
    for step in sorted({step for curve in curves.values() for step in curve}):
        cells = []
        for arm in arms:
            point = curves[arm].get(step)
            if point is None:
                cells.append("–")
                continue
            std = "" if math.isnan(point["std"]) else f" ± {point['std']:.3f}"
            cells.append(f"{point['mean']:.3f}{std} @ {point['tokens_processed']:.3g} tok")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def plot(ablation: Ablation, table: Mapping[str, Any], output: Path) -> Path:
    """Each metric over the evaluations (x), one line per arm, error bars one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    names = list(ablation.evaluations)
    panels = len(ablation.metrics) + bool(ablation.curve)
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    if ablation.curve:
        _plot_curves(axes[0][-1], ablation.curve, table["curves"])
    for ax, metric in zip(axes[0], ablation.metrics, strict=False):
        for arm, row in table["arms"].items():
            keys = [(i, f"{n}/{metric}") for i, n in enumerate(names)]
            points = [(i, row[key]) for i, key in keys if key in row]
            if not points:
                continue
            xs = [i for i, _ in points]
            means = [p["mean"] for _, p in points]
            stds = [0.0 if math.isnan(p["std"]) else p["std"] for _, p in points]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=arm)
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0)
        ax.set(title=metric, xlabel="evaluation", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"{ablation.name} (mean ± std over seeds {list(ablation.seeds)})", fontsize=10)
    figure.tight_layout()
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return output


def _plot_curves(ax, metric: str, curves: Mapping[str, Mapping[int, Any]]) -> None:
    """CURVE against the tokens processed, one line per arm, a band of one std over seeds."""
    for arm, curve in curves.items():
        if not curve:
            continue
        points = [curve[step] for step in sorted(curve)]
        tokens = [p["tokens_processed"] for p in points]
        means = [p["mean"] for p in points]
        stds = [0.0 if math.isnan(p["std"]) else p["std"] for p in points]
        ax.plot(tokens, means, marker="o", label=arm)
        ax.fill_between(tokens, [m - s for m, s in zip(means, stds, strict=True)],
                        [m + s for m, s in zip(means, stds, strict=True)], alpha=0.2)  # fmt: skip
    ax.set(title=f"{metric} during training", xlabel="tokens processed (padding included)",
           ylabel=metric)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_results(ablation: Ablation, root: Path) -> dict[str, Path]:
    """Aggregates the finished runs into results/<ablation>.{json,md,png} next to the file."""
    table = aggregate(ablation, root)
    folder = ablation.path.parent / "results"
    folder.mkdir(exist_ok=True)
    paths = {kind: folder / f"{ablation.name}.{kind}" for kind in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    paths["md"].write_text(markdown(ablation, table))
    plot(ablation, table, paths["png"])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m navit_seq.experiment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ablation", help="the ablation file, e.g. experiments/navit/resolution.py")
    parser.add_argument("--root", default="workdirs/experiments", help="where run workdirs go "
                        "(default: %(default)s)")  # fmt: skip
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--print-commands",
        action="store_true",
        help="print the commands of the runs not yet finished; run nothing",
    )
    mode.add_argument(
        "--aggregate", action="store_true", help="only tabulate and plot the runs that finished"
    )
    parser.add_argument("--seeds", default=None, help="comma-separated subset of SEEDS to run")
    cli.add_verbose_argument(parser)
    cli.add_quiet_argument(parser)
    args = parser.parse_args(argv)
    ablation = load_ablation(args.ablation)
    if args.seeds:
        chosen = tuple(int(s) for s in args.seeds.split(","))
        unknown = sorted(set(chosen) - set(ablation.seeds))
        if unknown:
            raise ValueError(
                f"--seeds {args.seeds}: {unknown} not in SEEDS={list(ablation.seeds)}."
            )
        ablation = Ablation(**{**ablation.__dict__, "seeds": chosen})
    root = Path(args.root)
    todo = stages(ablation, root, python="python" if args.print_commands else sys.executable)
    if args.print_commands:
        for stage in todo:
            if not stage.done_file.exists():
                done = f" && touch {shlex.quote(str(stage.done_file))}"
                print(shlex.join(stage.argv) + (done if stage.kind == "train" else ""))
        return 0
    if not args.aggregate:
        run_stages(todo)
    for kind, path in write_results(ablation, root).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
