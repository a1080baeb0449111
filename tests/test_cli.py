"""Every command: `--help` lists its flags with defaults and exits 0; an expected error is one
line on stderr with a non-zero exit (the traceback only on request); the compilation cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from navit_seq import cli

REPO = Path(__file__).resolve().parent.parent
TOY_RECIPE = "tests/train/toy_recipe.py"

# command line -> flags its help must list
HELP = {
    "navit_seq.main --help": ["--config", "--workdir", "--compilation_cache_dir", "--verbose",
                              "--quiet"],
    "navit_seq.evaluate -h": ["--config", "--workdir", "--step", "--compilation_cache_dir",
                              "--results_file", "--quiet"],
    "navit_seq.export --help": ["--config", "--workdir", "--step", "--dtype", "--ema", "--output",
                                "--compilation_cache_dir", "--verbose"],
    "navit_seq.predict --help": ["--workdir", "--image", "--task", "--output", "--step",
                                 "--min-score", "--verbose", "--quiet"],
    "navit_seq.data.build --help": ["scenes", "coco", "image-text", "COMMAND --help"],
    "navit_seq.data.build coco --help": ["--coco-dir", "--data-dir", "--name", "--image-dir",
                                         "--show", "--verbose", "--quiet"],
    "navit_seq.data.build scenes --help": ["--data-dir", "--train-size", "--num-workers",
                                           "--quiet"],
    "navit_seq.inspect --help": ["--config", "--image-sizes", "--num-batches", "--eval",
                                      "--output", "--rows-shown", "--verbose"],
    "navit_seq.quickstart --help": ["--data-dir", "--workdir", "--config", "--verbose",
                                    "--quiet"],
    "navit_seq.plot --help": ["--output", "--verbose"],
    "navit_seq.experiment --help": ["--root", "--print-commands", "--aggregate", "--seeds",
                                    "--quiet"],
}  # fmt: skip


def command(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.parametrize("line", HELP)
def test_help_lists_every_flag_with_its_default_and_exits_0(line):
    result = command(*line.split())
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in HELP[line]:  # absl writes a boolean flag as --[no]name
        assert flag in result.stdout.replace("--[no]", "--"), flag
    if "data.build --help" not in line:  # the subcommands' help lists the defaults
        assert "(default: " in result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """The run failed with exactly one `error: ...` line on stderr and no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in errors[0]
    return errors[0]


def test_training_without_the_dataset_is_one_line_naming_data_dir_and_the_build_command(
    tmp_path,
):
    result = command("navit_seq.main", "--config", "configs/quickstart.py", "--workdir",
                     str(tmp_path / "run"), f"--config.data.data_dir={tmp_path}")  # fmt: skip
    assert_one_line_error(
        result, f"no dataset 'scenes' in data_dir='{tmp_path}'", "python -m navit_seq.data.build"
    )


def test_evaluating_a_workdir_without_checkpoints_is_one_line_naming_it(tmp_path):
    result = command("navit_seq.evaluate", "--config", TOY_RECIPE, "--workdir", str(tmp_path))
    assert_one_line_error(result, f"No checkpoint in {tmp_path / 'checkpoints'}", "--workdir")


def test_predict_on_an_untrained_workdir_is_one_line(tmp_path):
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 6)).save(image)
    result = command("navit_seq.predict", "--workdir", str(tmp_path), "--image", str(image))
    assert_one_line_error(result, f"--workdir {tmp_path}: no config.json; train there first")


def test_bad_coco_folder_is_one_line_and_verbose_adds_the_traceback(tmp_path):
    argv = ("navit_seq.data.build", "coco", "--coco-dir", str(tmp_path), "--data-dir",
            str(tmp_path / "tfds"))  # fmt: skip
    assert_one_line_error(command(*argv), "has no 'annotations/' folder; point --coco-dir")
    verbose = command(*argv, "--verbose")
    assert verbose.returncode != 0
    assert "Traceback" in verbose.stderr and "CocoFormatError" in verbose.stderr
    assert verbose.stderr.splitlines()[-1].startswith("error: coco_dir=")


def test_debug_environment_variable_also_asks_for_tracebacks(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert not cli.verbose(["--workdir", "w"]) and cli.verbose(["--verbose"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.verbose([])


def test_bug_keeps_its_traceback():
    def broken() -> None:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        cli.run(broken, argv=[])


def test_expected_error_exits_1_with_its_message_on_one_line():
    def failing() -> None:
        raise FileNotFoundError("first line\n  second line")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(failing, argv=[])
    assert exit_info.value.code == "error: first line second line"  # sys.exit: stderr, code 1


def test_commands_cache_compiled_programs_in_the_flag_folder(tmp_path):
    code = (
        "import jax\n"
        "from navit_seq import config_utils\n"
        "def main(argv):\n"
        "    jax.jit(lambda x: x * 2.0)(1.0).block_until_ready()\n"
        "    print(jax.config.jax_compilation_cache_dir)\n"
        "config_utils.run(main)\n"
    )
    folder = tmp_path / "jax_cache"
    result = subprocess.run(
        [sys.executable, "-c", code, f"--compilation_cache_dir={folder}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(folder)]
    assert any(folder.iterdir())  # the tiny program was cached: no compile-time threshold


def test_compilation_cache_folder_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(cli.CACHE_ENV, "/somewhere/jax")
    assert cli.default_compilation_cache_dir() == "/somewhere/jax"
    monkeypatch.delenv(cli.CACHE_ENV)
    assert cli.default_compilation_cache_dir() == str(Path.home() / ".cache/navit_seq/jax")
    assert cli.enable_compilation_cache("") is None  # '' = off, JAX untouched


def test_recipe_argument_typo_is_one_line_listing_the_recipe_arguments():
    result = command("navit_seq.main", "--config", f"{TOY_RECIPE}:stpes=3", "--workdir", "unused")
    assert_one_line_error(result, "recipe argument 'stpes'", "it takes steps, sleep")


def test_image_dir_option_is_repeatable_and_a_malformed_one_is_refused(capsys):
    from navit_seq.data import build

    base = ["coco", "--coco-dir", "c", "--data-dir", "d"]
    args = build._parser().parse_args([*base, "--image-dir", "train=/x", "--image-dir", "val=y"])
    assert dict(args.image_dir) == {"train": "/x", "val": "y"}
    with pytest.raises(SystemExit):
        build._parser().parse_args([*base, "--image-dir", "/x"])
    assert "'/x' is not SPLIT=FOLDER" in capsys.readouterr().err


def test_build_report_names_the_image_folder_found(tmp_path):
    # The user's layout end to end: images/<split>/... with file_name "<split>/<file>".
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "images" / "train" / "000001.png")
    records = {"images": [{"id": 1, "file_name": "train/000001.png", "height": 6, "width": 8}],
               "annotations": [], "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(records))
    result = command("navit_seq.data.build", "coco", "--coco-dir", str(tmp_path), "--data-dir",
                     str(tmp_path / "tfds"), "--name", "users_layout")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'"image_dir": "{tmp_path / "images"}"' in result.stdout


def test_durations_read_as_seconds_minutes_or_hours():
    assert [cli.format_duration(s) for s in (0.4, 45, 185, 7440)] == ["0s", "45s", "3m05s",
                                                                      "2h04m"]  # fmt: skip


def test_progress_line_has_count_share_rate_elapsed_and_eta():
    line = cli.progress_line("train", 120, 300, "steps", 1.5, 79.0)
    assert line == "train: 120/300 steps (40%), 1.5 steps/s, 1m19s elapsed, ETA 2m00s"
    # No total: no share and no ETA; no rate yet: neither rate nor ETA.
    assert cli.progress_line("eval", 12, None, "batches", 2.0, 6) == (
        "eval: 12 batches, 2 batches/s, 6s elapsed"
    )
    assert cli.progress_line("train", 1, 300, "steps", None, 62) == (
        "train: 1/300 steps (0%), 1m02s elapsed"
    )


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_progress(steps_at: list[float], monkeypatch, capsys, quiet: bool = False) -> list[str]:
    """Updates a 4-step Progress at the given clock times, closes it: its stderr lines."""
    monkeypatch.setenv(cli.QUIET_ENV, "1" if quiet else "0")
    clock = FakeClock()
    progress = cli.Progress("train", total=4, unit="steps", every_s=10, clock=clock)
    for step, time in enumerate(steps_at, 1):
        clock.now = time
        progress.update(step)
    progress.close()
    captured = capsys.readouterr()
    assert captured.out == ""  # progress never mixes with the results on stdout
    return captured.err.splitlines()


def test_progress_prints_every_interval_timed_after_the_first_step(monkeypatch, capsys):
    # Step 1 ends at 12 s (compilation), then one step per 2 s.
    assert run_progress([12, 14, 16, 18], monkeypatch, capsys) == [
        "train: 1/4 steps (25%), 12s elapsed",  # no rate yet: it is timed from step 1
        "train: 4/4 steps (100%), 0.5 steps/s, 18s elapsed",  # the last line, at close
    ]


def test_progress_of_short_work_prints_nothing(monkeypatch, capsys):
    assert run_progress([1, 2, 3, 4], monkeypatch, capsys) == []


def test_quiet_silences_progress(monkeypatch, capsys):
    assert run_progress([12, 14, 16, 18], monkeypatch, capsys, quiet=True) == []


def test_quiet_flag_is_exported_to_the_command_and_the_processes_it_starts(monkeypatch):
    monkeypatch.delenv(cli.QUIET_ENV, raising=False)
    assert not cli.quiet()
    with pytest.raises(SystemExit):
        cli.run(lambda: 0, argv=["--quiet"])
    assert cli.quiet() and os.environ[cli.QUIET_ENV] == "1"
