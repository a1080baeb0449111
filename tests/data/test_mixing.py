"""Multi-task mixing: task frequencies follow the weights, exact restore, evaluation per task."""

import json

import numpy as np
import pytest

from navit_seq import pipeline
from navit_seq.data import mixing, sources

WEIGHTS = (("detection", 0.2), ("segmentation", 0.5), ("captioning", 0.3))
TASK_IDS = {"detection": 1, "segmentation": 2, "captioning": 4}


def mixed_config(data_dir, mixing_mode, **overrides):
    config = pipeline.default_data_config()
    config.update(data_dir=data_dir, patch_size=8, seq_len=64, batch_size=4, num_workers=0)
    config.update(max_examples_per_seq=8, max_rows_per_seq=16, eval_max_tokens=16)
    config.update(tasks=WEIGHTS, mixing=mixing_mode)
    config.resolution.update(min_side=8, max_side=32)
    config.task = {"name": "detection", "seq_len": 32, "max_instances": 2}
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def train_source(scenes_data_dir):
    return sources.data_source("scenes", "train", scenes_data_dir)


def test_task_draws_follow_the_weights():
    probabilities = [0.2, 0.5, 0.3]
    draws = [mixing.draw_task(probabilities, seed=7, position=n) for n in range(20000)]
    frequencies = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(frequencies, probabilities, atol=0.015)


def test_data_mixing_encodes_examples_by_task_in_proportion_to_the_weights(
    scenes_data_dir, train_source
):
    iterator = iter(
        pipeline.make_dataset(train_source, mixed_config(scenes_data_dir, "data"), train=True)
    )
    mixed_batches = 0
    while iterator.stats["examples_read"] < 400:
        batch = next(iterator)
        mixed_batches += len(set(batch["task_id"][batch["example_valid"]].tolist())) > 1
    read = iterator.stats["examples_read"]
    frequencies = [iterator.stats[f"{name}/examples"] / read for name, _ in WEIGHTS]
    np.testing.assert_allclose(frequencies, [w for _, w in WEIGHTS], atol=0.06)
    assert mixed_batches > 0  # tasks do share packed batches


def test_batch_mixing_takes_each_batch_from_one_task_drawn_by_weight(scenes_data_dir, train_source):
    dataset = pipeline.make_dataset(
        train_source, mixed_config(scenes_data_dir, "batch"), train=True
    )
    probabilities = [w for _, w in WEIGHTS]
    for n, batch in zip(range(12), dataset, strict=False):
        expected = TASK_IDS[WEIGHTS[mixing.draw_task(probabilities, dataset.seed, n)][0]]
        assert set(batch["task_id"][batch["example_valid"]].tolist()) == {expected}


@pytest.mark.parametrize("mode", ["batch", "data"])
def test_restore_after_checkpoint_gives_the_same_next_batches(scenes_data_dir, train_source, mode):
    config = mixed_config(scenes_data_dir, mode)
    config.token_drop.update(kind="beta", d_mean=0.3, d_max=0.6)
    dataset = pipeline.make_dataset(train_source, config, train=True)
    iterator = iter(dataset)
    for _ in range(4):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = [next(iterator) for _ in range(3)]
    restored = iter(dataset)
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(3)), strict=True):
        for key in want:
            if key != "targets":
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert restored.stats == iterator.stats


def test_evaluation_encodes_every_example_once_by_each_task(scenes_data_dir):
    source = sources.data_source("scenes", "validation", scenes_data_dir)
    config = mixed_config(scenes_data_dir, "batch", tasks=(("detection", 1.0), ("captioning", 3.0)))
    pairs = []
    for batch in pipeline.make_dataset(source, config, train=False):
        valid = batch["example_valid"]
        pairs += list(
            zip(batch["task_id"][valid].tolist(), batch["example_id"][valid].tolist(), strict=True)
        )
    assert sorted(pairs) == sorted((task, i) for task in (1, 4) for i in range(len(source)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tasks": (("detection", 0.0),)}, "weight must be a positive"),
        ({"tasks": (("detection", 1.0), ("detection", 1.0))}, "repeat a task"),
        ({"tasks": (("detection",),)}, r"\(task name, weight\) pairs"),
        ({"mixing": "round_robin"}, "data.mixing='round_robin'"),
    ],
)
def test_bad_mixing_config_raises_naming_the_field(overrides, message):
    config = pipeline.default_data_config()
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        pipeline.validate_data_config(config)


def test_tasks_that_shape_rows_differently_raise_naming_the_option(scenes_data_dir, train_source):
    config = mixed_config(scenes_data_dir, "data")
    config.task.captioning = {"seq_len": 16}
    with pytest.raises(ValueError, match="same data.task options"):
        pipeline.make_dataset(train_source, config, train=True)


def test_batch_mixing_draws_the_same_task_on_every_host(scenes_data_dir, train_source):
    config = mixed_config(scenes_data_dir, "batch")
    hosts = [
        pipeline.make_dataset(
            train_source, config, train=True, process_index=index, process_count=2
        )
        for index in range(2)
    ]
    for first, second in zip(*(zip(range(8), host, strict=False) for host in hosts), strict=True):
        tasks = [set(b["task_id"][b["example_valid"]].tolist()) for _, b in (first, second)]
        assert tasks[0] == tasks[1] and len(tasks[0]) == 1
        assert not np.array_equal(first[1]["example_id"], second[1]["example_id"])
