"""The command line: train / resume / preempt in subprocesses; evaluate, export, config errors.

The toy recipe (tests/train/toy_recipe.py) trains the real loop on the stand-in model and a
checkpointable synthetic grain stream, so these tests do not depend on the dataset or encoder.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from train import toy, toy_recipe

from navit_seq import config_utils, evaluate, export
from navit_seq.main import objective_for
from navit_seq.train import checkpoint as checkpoint_lib
from navit_seq.train import loop

REPO = Path(__file__).resolve().parent.parent
RECIPE = "tests/train/toy_recipe.py"
STEPS = 12
TIMING_KEYS = {"step_time_s", "images_per_s", "tokens_per_s"}
IN_PROCESS_STEPS = 6
IN_PROCESS_RECIPE = f"{RECIPE}:steps={IN_PROCESS_STEPS}"


def start_main(workdir: Path, arg: str = f"steps={STEPS}", *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "navit_seq.main", "--config", f"{RECIPE}:{arg}",
         "--workdir", str(workdir), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def rows(workdir: Path, split: str = "train") -> list[dict]:
    """metrics.jsonl rows of `split` without the timing scalars (those differ run to run)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines if line]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in parsed
            if r["split"] == split]  # fmt: skip


def wait_for(condition, timeout: float = 180, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


def finalized_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workdir of the toy recipe trained in-process for 6 steps (checkpoints at 2, 4, 6)."""
    workdir = tmp_path_factory.mktemp("trained")
    config = toy_recipe.get_config(f"steps={IN_PROCESS_STEPS}")
    loop.train_and_evaluate(config, workdir, toy.toy_objective(config))
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and, concurrently, a run SIGKILLed after a checkpoint + its restart."""
    root = tmp_path_factory.mktemp("commands")
    reference, killed = root / "reference", root / "killed"
    reference_process = start_main(reference)
    victim = start_main(killed, f"steps={STEPS},sleep=0.3")
    wait_for(lambda: finalized_steps(killed), what="the first checkpoint")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    before_restart = rows(killed)
    killed_at = max(r["step"] for r in before_restart)
    resumed_output = finish(start_main(killed))
    finish(reference_process)
    return dict(reference=reference, killed=killed, before_restart=before_restart,
                killed_at=killed_at, resumed_output=resumed_output)  # fmt: skip


@pytest.mark.slow
def test_run_killed_after_checkpoint_resumes_with_identical_losses_and_batches(runs):
    assert "Resumed from" in runs["resumed_output"]
    # The entry point applied the CPU settings before JAX started (no "too late" warning).
    assert "cpu_runtime: synchronous dispatch, glibc keeps freed memory" in runs["resumed_output"]
    assert "before the first JAX computation" not in runs["resumed_output"]
    assert runs["killed_at"] < STEPS  # it really was killed mid-way
    reference, resumed = rows(runs["reference"]), rows(runs["killed"])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    # Bit-identical on CPU: every loss and every batch fingerprint of every step.
    assert resumed == reference
    assert rows(runs["killed"], "eval") == rows(runs["reference"], "eval")


@pytest.mark.slow
def test_two_processes_with_the_same_seed_and_config_log_the_same_metrics(runs):
    first_run = runs["before_restart"]  # logged by the other process before it was killed
    reference = rows(runs["reference"])
    assert first_run and first_run == reference[: len(first_run)]


def test_metrics_jsonl_has_step_split_and_scalars_and_tensorboard_events(trained):
    workdir = trained
    logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in logged if r["split"] == "train" and r["step"] == IN_PROCESS_STEPS)
    for key in ("loss", "precision_at_1", "learning_rate", "grad_norm", "padding_fraction",
                "images_per_s", "tokens_per_s", "step_time_s"):  # fmt: skip
        assert np.isfinite(row[key]), key
    assert [r["step"] for r in logged if r["split"] == "train"] == list(range(1, 7))
    assert {r["step"] for r in logged if r["split"] == "eval"} == {3, 6}
    assert list(workdir.glob("events.out.tfevents.*"))


def test_same_seed_and_config_give_the_same_metrics_twice(trained, tmp_path):
    config = toy_recipe.get_config(f"steps={IN_PROCESS_STEPS}")
    loop.train_and_evaluate(config, tmp_path, toy.toy_objective(config))
    assert rows(tmp_path) == rows(trained)
    assert rows(tmp_path, "eval") == rows(trained, "eval")


def test_stopped_run_restarted_in_its_workdir_continues_exactly(trained, tmp_path):
    config = toy_recipe.get_config("steps=4")
    loop.train_and_evaluate(config, tmp_path, toy.toy_objective(config))
    config = toy_recipe.get_config(f"steps={IN_PROCESS_STEPS}")
    loop.train_and_evaluate(config, tmp_path, toy.toy_objective(config))
    assert rows(tmp_path) == rows(trained)  # steps 5, 6 from the step-4 checkpoint, same batches


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(tmp_path):
    process = start_main(tmp_path, "steps=1000,sleep=0.3")
    wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(rows(tmp_path)) >= 3,
             what="three logged steps")  # fmt: skip
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    last_step = max(r["step"] for r in rows(tmp_path))
    assert "Preempted" in output
    assert finalized_steps(tmp_path)[-1] == last_step < 1000


@pytest.fixture
def parsed_flags():
    """Parses a command line in-process (as absl would) and restores the flags afterwards."""

    def parse(*argv: str) -> None:
        config_utils.parse_flags(["prog", *argv])

    yield parse
    flags.FLAGS.unparse_flags()


def parse_in_subprocess(*argv: str) -> subprocess.CompletedProcess:
    """The flag parsing every command uses, in a fresh process (absl flags are global)."""
    code = "from navit_seq import config_utils; config_utils.run(lambda argv: None)"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_unknown_config_key_is_an_error_naming_the_key():
    result = parse_in_subprocess("--config", RECIPE, "--config.optimizer.learning_rat=0.1")
    assert result.returncode != 0
    assert "unknown config key 'optimizer.learning_rat'" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_value_of_the_wrong_type_is_an_error_naming_the_flag():
    result = parse_in_subprocess("--config", RECIPE, "--config.num_train_steps=many")
    assert result.returncode != 0
    assert "--config.num_train_steps=many" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_writes_eval_results_matching_the_final_eval_metrics(trained, parsed_flags):
    workdir = trained
    parsed_flags("--config", IN_PROCESS_RECIPE, "--workdir", str(workdir))
    evaluate.main(["prog"])
    results = json.loads((workdir / "eval_results.json").read_text())
    assert results["step"] == IN_PROCESS_STEPS
    logged = rows(workdir, "eval")[-1]
    for name, value in results["metrics"].items():
        assert value == pytest.approx(logged[name], rel=1e-6), name


def test_export_restores_cast_parameters_without_optimizer_state(trained, parsed_flags, tmp_path):
    workdir = trained
    parsed_flags("--config", IN_PROCESS_RECIPE, "--workdir", str(workdir), "--dtype", "bfloat16",
                 "--output", str(tmp_path / "export"))  # fmt: skip
    export.main(["prog"])
    assert not (tmp_path / "export" / "params" / "opt_state").exists()
    config, model = export.load(tmp_path / "export")
    exported = nnx.state(model, nnx.Param)
    trainer = loop.Trainer(config, objective_for(config))
    _, state = checkpoint_lib.Checkpointer(workdir / "checkpoints", every_steps=0).restore_state(
        None, trainer.abstract_state
    )
    for got, trained in zip(jax.tree.leaves(exported), jax.tree.leaves(state.params), strict=True):
        assert got.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(got), np.asarray(trained.astype(got.dtype)))


@pytest.mark.parametrize(
    "recipe", ["configs/quickstart.py", "configs/navit_shapes.py", "configs/navit_textures.py",
               "configs/navit_b16_pretrain.py", "configs/pix2seq_v2_multitask.py"],
)  # fmt: skip
def test_every_recipe_has_the_contract_fields_and_valid_mesh_rules(recipe):
    from navit_seq import sharding

    config = config_utils.load_config_file(str(REPO / recipe))
    assert all(field in config for field in config_utils.REQUIRED_FIELDS)
    assert config.model.patch_size == config.data.patch_size
    sharding.logical_rules(config.mesh)  # raises on unknown logical or mesh axes
    assert config.optimizer.schedule.decay_steps == config.num_train_steps


def test_paper_scale_recipes_refuse_to_run_here():
    result = subprocess.run(
        [sys.executable, "-c", "from navit_seq import config_utils as c; "
         "c.run(lambda argv: c.validated_config())", "--config",
         "configs/navit_b16_pretrain.py"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "not runnable on this machine" in result.stderr


def test_diverging_run_stops_with_a_message_naming_the_last_good_checkpoint(tmp_path):
    from navit_seq.train.metrics import NonFiniteError

    config = toy_recipe.get_config("steps=6")
    # Step 1 runs at lr 0 (warmup start) and is checkpointed; step 2's update overflows.
    config.optimizer.learning_rate = 1e38
    config.optimizer.schedule.warmup_steps = 2
    config.optimizer.grad_clip_norm = 0.0
    config.checkpoint_every_steps = 1
    with pytest.raises(NonFiniteError, match="Non-finite metrics at step 2") as error:
        loop.train_and_evaluate(config, tmp_path, toy.toy_objective(config))
    assert f"last good checkpoint is {tmp_path.absolute() / 'checkpoints' / '1'}" in str(
        error.value
    )
    assert checkpoint_lib.Checkpointer(tmp_path / "checkpoints", every_steps=0).latest_step() == 1


def test_resuming_a_workdir_of_another_model_is_refused_naming_it(tmp_path):
    saved = toy.toy_config()
    config_utils.save_config(saved, tmp_path / "config.json")
    same = toy.toy_config()
    with same.unlocked():
        same.data.data_dir = "elsewhere"  # data paths may change between runs
    config_utils.check_same_recipe(same, tmp_path / "config.json")
    other = toy.toy_config()
    with other.unlocked():
        other.model.dropout = 0.5
    with pytest.raises(SystemExit, match=r"different model .*new --workdir"):
        config_utils.check_same_recipe(other, tmp_path / "config.json")


def test_starting_from_a_run_of_another_model_is_refused_naming_init_from(tmp_path):
    saved = toy.toy_config()
    config_utils.save_config(saved, tmp_path / "config.json")
    other = toy.toy_config()
    with other.unlocked():
        other.model.dropout = 0.5
    with pytest.raises(SystemExit, match=r"different model .*init_from=.*same trainer and model"):
        config_utils.check_same_recipe(
            other, tmp_path / "config.json", use=f"config.init_from={str(tmp_path)!r}: "
            "starting from it", fix="Point init_from at a run of the same trainer and model.",
        )  # fmt: skip


def test_config_json_holds_the_values_the_objective_resolved(scenes_data_dir, tmp_path):
    from navit_seq import main
    from navit_seq.data import sources

    config = config_utils.load_config_file("configs/quickstart.py")
    config.data.data_dir = scenes_data_dir
    assert config.model.num_classes == 0  # the recipe leaves the class count to the dataset
    main.prepare_run(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    num_classes = len(sources.class_names("scenes", scenes_data_dir))
    assert saved["model"]["num_classes"] == saved["data"]["task"]["num_classes"] == num_classes
    assert num_classes > 0
