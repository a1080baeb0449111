"""The recipes' shared header: loop fields, ties, the `runlocal` switch, and no JAX import."""

import subprocess
import sys

import pytest

from navit_seq import config_common


def test_header_ties_the_schedule_to_the_number_of_steps_and_holds_the_shared_sections():
    config = config_common.header(
        "classification", steps=40, log_every_steps=5, eval_every_steps=0,
        checkpoint_every_steps=10, keep_checkpoints=1,
    )  # fmt: skip
    assert {"mesh", "distributed", "optimizer"} <= set(config)
    assert config.optimizer.schedule.decay_steps == 40
    config.num_train_steps = 7
    assert config.optimizer.schedule.decay_steps == 7


def test_a_switch_is_a_bare_name_and_a_name_value_pair_is_not_a_switch():
    options = config_common.recipe_options(
        "runlocal,steps=3", known=("steps",), switches=(config_common.RUNLOCAL,)
    )
    assert options == {"runlocal": "", "steps": "3"}
    with pytest.raises(ValueError, match="'runloc' .* it takes steps, runlocal"):
        config_common.recipe_options("runloc=1", known=("steps",), switches=("runlocal",))
    with pytest.raises(ValueError, match="is not name=value"):
        config_common.recipe_options("runlocal", known=("steps",))  # not a switch here


def test_reading_the_header_imports_neither_jax_nor_pycocotools():
    code = (
        "import sys; import navit_seq.config_common; "
        "print(sorted(m for m in ('jax', 'flax', 'pycocotools', 'grain') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
