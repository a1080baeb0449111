"""The ablation runner: commands per (arm, seed), resuming, aggregation against numpy."""

import json
import textwrap

import numpy as np
import pytest

from navit_seq import experiment

ABLATION = """
RECIPE = "configs/navit_shapes.py:steps=7"
ARMS = {"packed": {"data.packing": True}, "padded": {"data.packing": False}}
SEEDS = (0, 1, 2)
METRICS = ("precision_at_1",)
COMPUTE = "the same 7 steps of 16 x 256 tokens."
PAPER = {"packed": "4x less compute", "": "NaViT Fig. 1"}
COMMON = {"num_train_steps": 7, "data.resolution.kind": "uniform_side"}
EVALUATIONS = {"side32": {"data.eval_side": 32}, "side128": {"data.eval_side": 128}}
CURVE = "precision_at_1"


def verdict(table):
    return "packed: " + str(round(table["arms"]["packed"]["side128/precision_at_1"]["mean"], 3))
"""


@pytest.fixture
def ablation(tmp_path):
    path = tmp_path / "toy_ablation.py"
    path.write_text(textwrap.dedent(ABLATION))
    return experiment.load_ablation(path)


def test_missing_fields_are_named(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("RECIPE = 'configs/x.py'\n")
    with pytest.raises(ValueError, match=r"lacks \['ARMS', 'SEEDS', 'METRICS'"):
        experiment.load_ablation(path)
    with pytest.raises(FileNotFoundError, match="no ablation file"):
        experiment.load_ablation(tmp_path / "absent.py")


def test_each_arm_and_seed_trains_into_its_own_workdir_then_evaluates(ablation, tmp_path):
    stages = experiment.stages(ablation, tmp_path / "runs", python="python")
    assert len(stages) == 2 * 3 * 3  # (train + 2 evaluations) per arm and seed
    train = stages[0]
    workdir = tmp_path / "runs" / "toy_ablation" / "packed" / "seed0"
    assert train.kind == "train" and train.done_file == workdir / experiment.TRAIN_DONE
    assert train.argv[:3] == ("python", "-m", "navit_seq.main")
    assert "--config.data.packing=True" in train.argv and "--config.seed=0" in train.argv
    assert "--config.data.seed=0" in train.argv and "--config.num_train_steps=7" in train.argv
    evaluation = stages[1]
    assert evaluation.argv[2] == "navit_seq.evaluate"
    assert "--config.data.eval_side=32" in evaluation.argv
    assert evaluation.argv[-1] == "--results_file=eval_side32.json"
    assert stages[3].arm == "packed" and stages[3].seed == 1
    assert "--config.data.packing=False" in stages[9].argv


def _fake_execute(accuracy):
    """Writes what a training / evaluation command would: metrics.jsonl or its results file."""

    def execute(argv):
        workdir = experiment.Path(argv[argv.index("--workdir") + 1])
        workdir.mkdir(parents=True, exist_ok=True)
        if argv[2] == "navit_seq.main":
            arm, seed = workdir.parent.name, int(workdir.name[4:])
            rows = [
                {"step": 5, "split": "train", "images_per_step": 10.0, "tokens_per_step": 100.0},
                {"step": 6, "split": "eval", "precision_at_1": curve_value(arm, seed, 6)},
                {
                    "step": 7,
                    "split": "train",
                    "images_per_step": 12.0,
                    "tokens_per_step": 100.0,
                    "padding_fraction": 0.75,
                },  # fmt: skip
                {"step": 7, "split": "eval", "precision_at_1": curve_value(arm, seed, 7)},
            ]
            (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            name = argv[-1].split("=")[1]
            arm, seed = workdir.parent.name, int(workdir.name[4:])
            metrics = {"precision_at_1": accuracy(arm, seed, name)}
            (workdir / name).write_text(json.dumps({"step": 7, "metrics": metrics}))
        return 0

    return execute


def curve_value(arm, seed, step):
    return (0.4 if arm == "packed" else 0.2) + 0.05 * seed + 0.01 * step


def accuracy(arm, seed, name):
    return (0.5 if arm == "packed" else 0.3) + 0.1 * seed + (0.2 if "128" in name else 0.0)


def test_a_second_sweep_skips_what_finished_and_a_failure_stops(ablation, tmp_path):
    stages = experiment.stages(ablation, tmp_path)
    first = experiment.run_stages(stages[:4], _fake_execute(accuracy))
    assert len(first) == 4
    again = experiment.run_stages(stages[:6], _fake_execute(accuracy))
    ran = [(s.arm, s.seed, s.kind) for s in again]
    assert ran == [("packed", 1, "side32"), ("packed", 1, "side128")]
    with pytest.raises(RuntimeError, match="packed seed 2 train failed with exit code 3"):
        experiment.run_stages(stages, lambda argv: 3)


def test_table_is_mean_and_sample_std_over_seeds_with_compute(ablation, tmp_path):
    experiment.run_stages(experiment.stages(ablation, tmp_path), _fake_execute(accuracy))
    table = experiment.aggregate(ablation, tmp_path)
    for arm in ("packed", "padded"):
        for name in ("side32", "side128"):
            values = [accuracy(arm, seed, f"eval_{name}.json") for seed in range(3)]
            cell = table["arms"][arm][f"{name}/precision_at_1"]
            assert cell["mean"] == pytest.approx(np.mean(values))
            assert cell["std"] == pytest.approx(np.std(values, ddof=1))
            assert cell["seeds"] == {s: pytest.approx(v) for s, v in enumerate(values)}
        assert table["arms"][arm]["images_seen"]["mean"] == 5 * 10 + 2 * 12
        assert table["arms"][arm]["tokens_seen"]["mean"] == 700
        # 100 real tokens are a quarter of the 400 processed in the padded window.
        assert table["arms"][arm]["tokens_processed"]["mean"] == 5 * 100 + 2 * 400
    text = experiment.markdown(ablation, table)
    assert "| packed | 0.600 ± 0.100 (n=3) | 0.800 ± 0.100 (n=3) |" in text
    assert "4x less compute" in text and "NaViT Fig. 1" in text
    assert "**Verdict:** packed: 0.8" in text
    assert "the same 7 steps" in text


def test_curve_is_each_in_training_evaluation_against_the_compute_spent_by_then(ablation, tmp_path):
    experiment.run_stages(experiment.stages(ablation, tmp_path), _fake_execute(accuracy))
    curves = experiment.aggregate(ablation, tmp_path)["curves"]
    for arm in ("packed", "padded"):
        assert sorted(curves[arm]) == [6, 7]
        for step in (6, 7):
            values = [curve_value(arm, seed, step) for seed in range(3)]
            assert curves[arm][step]["mean"] == pytest.approx(np.mean(values))
            assert curves[arm][step]["std"] == pytest.approx(np.std(values, ddof=1))
        # Step 6 lies inside the window (5, 7]: 5 steps at 10 images, then 1 at 12.
        assert curves[arm][6]["images_seen"] == 5 * 10 + 1 * 12
        assert curves[arm][6]["tokens_seen"] == 600
        assert curves[arm][6]["tokens_processed"] == 5 * 100 + 1 * 400
        assert curves[arm][7]["tokens_processed"] == 5 * 100 + 2 * 400
    text = experiment.markdown(ablation, experiment.aggregate(ablation, tmp_path))
    assert "| 6 | 0.510 ± 0.050 @ 900 tok | 0.310 ± 0.050 @ 900 tok |" in text


def test_results_are_written_next_to_the_ablation(ablation, tmp_path):
    experiment.run_stages(experiment.stages(ablation, tmp_path / "runs"), _fake_execute(accuracy))
    paths = experiment.write_results(ablation, tmp_path / "runs")
    assert paths["md"] == tmp_path / "results" / "toy_ablation.md"
    assert paths["png"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["arms"]["padded"]


def test_print_commands_lists_only_unfinished_runs(ablation, tmp_path, capsys):
    experiment.run_stages(experiment.stages(ablation, tmp_path)[:3], _fake_execute(accuracy))
    capsys.readouterr()  # the sweep's own progress lines
    experiment.main([str(ablation.path), "--root", str(tmp_path), "--print-commands"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 18 - 3
    assert lines[0].startswith("python -m navit_seq.main") and lines[0].endswith(
        f"&& touch {tmp_path}/toy_ablation/packed/seed1/{experiment.TRAIN_DONE}"
    )


ABLATION_FILES = sorted(experiment.Path("experiments").glob("*/[!_]*.py"))
ABLATION_FILES = [p for p in ABLATION_FILES if "RECIPE = " in p.read_text()]


@pytest.mark.parametrize("path", ABLATION_FILES, ids=lambda p: p.stem)
def test_every_committed_ablation_names_real_config_fields(path, tmp_path):
    """Each arm's and evaluation's overrides are keys of its recipe (a typo would only fail
    after the first arm has trained), and the ablation has >= 3 seeds."""
    from navit_seq import config_utils

    ablation = experiment.load_ablation(path)
    assert len(ablation.seeds) >= 3
    config = config_utils.load_config_file(ablation.recipe)
    for stage in experiment.stages(ablation, tmp_path):
        assert config_utils.unknown_override(config, stage.argv) is None, (stage.arm, stage.kind)
