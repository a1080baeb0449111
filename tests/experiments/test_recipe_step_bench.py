"""experiments/benchmarks/recipe_step.py on a tiny detection recipe: every figure comes back."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments" / "benchmarks"))
sys.path.insert(0, str(Path(__file__).parents[1]))
import recipe_step  # noqa: E402
from test_inference import tiny_detection_run  # noqa: E402


@pytest.mark.slow  # compiles a train step (~20 s)
def test_recipe_step_times_the_pipeline_and_the_trainer_step(scenes_data_dir):
    config = tiny_detection_run(scenes_data_dir)
    result = recipe_step.measure(config, batches=2, steps=2)
    assert result["pipeline_s_per_batch"] > 0 and result["step_s"] > 0
    assert result["images_per_batch"] >= config.data.batch_size  # >= one image per row
    assert result["row_length"] == config.data.task.seq_len
    assert result["vocab_size"] == config.model.decoder.vocab_size > 0
