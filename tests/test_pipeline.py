"""Pipeline assembly: grain workers, Orbax checkpointing, per-host reading, bad input."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from navit_seq import pipeline

NUM_CLASSES = 3


def small_config(**overrides):
    config = pipeline.default_data_config()
    config.update(patch_size=8, seq_len=64, batch_size=4, max_examples_per_seq=4, num_workers=0)
    config.update(pack_buffer_size=8, eval_max_tokens=64)
    config.resolution.update(min_side=16, max_side=64)
    config.task.num_classes = NUM_CLASSES
    config.update(overrides)
    return config


def example(image, labels=(0,), bbox=None):
    objects = {"label": np.array(labels, np.int64)}
    if bbox is not None:
        objects["bbox"] = np.array(bbox, np.float32)
    return {"image": image, "objects": objects}


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    return [
        example(rng.integers(0, 256, (rng.integers(8, 120), rng.integers(8, 120), 3), np.uint8))
        for _ in range(40)
    ]


def flat(batch):
    return {**{k: v for k, v in batch.items() if k != "targets"}, **batch["targets"]}


def test_orbax_restore_with_worker_processes_gives_the_same_next_batch(source, tmp_path):
    config = small_config(num_workers=1)
    config.token_drop.update(kind="beta", d_mean=0.3, d_max=0.6)
    dataset = pipeline.make_dataset(source, config, train=True)
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = [next(iterator) for _ in range(2)]
    iterator.close()

    restored = iter(dataset)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for want, got in zip(expected, [next(restored) for _ in range(2)], strict=True):
        for key, value in flat(want).items():
            np.testing.assert_array_equal(flat(got)[key], value, err_msg=key)
    restored.close()


def test_workers_produce_the_same_batches_as_the_main_process(source):
    in_process = iter(pipeline.make_dataset(source, small_config(), train=True))
    workers = iter(pipeline.make_dataset(source, small_config(num_workers=1), train=True))
    for _ in range(3):
        want, got = next(in_process), next(workers)
        np.testing.assert_array_equal(got["patches"], want["patches"])
        np.testing.assert_array_equal(got["example_id"], want["example_id"])
    workers.close()


def test_hosts_read_disjoint_records_that_cover_the_source(source):
    config = small_config(num_epochs=1)
    seen = []
    for process_index in range(2):
        dataset = pipeline.make_dataset(
            source, config, train=True, process_index=process_index, process_count=2
        )
        batches = list(dataset)
        assert batches[0]["patches"].shape[0] == 2  # batch_size / process_count rows
        seen.append({i for b in batches for i in b["example_id"][b["example_valid"]].tolist()})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(source)))


def test_batch_size_not_divisible_by_hosts_raises():
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 3 processes"):
        pipeline.make_dataset([], small_config(), train=True, process_count=3)


def test_unusual_images_and_annotations_are_converted_and_counted():
    rng = np.random.default_rng(0)
    bad = [
        example(np.full((1, 4000, 3), 7, np.uint8)),  # extreme aspect ratio
        example(rng.integers(0, 256, (40, 30), np.uint8)),  # grayscale
        example(rng.integers(0, 256, (40, 30, 4), np.uint8)),  # RGBA
        example(rng.integers(0, 65536, (40, 30, 3), np.uint16)),  # 16-bit
        example(np.zeros((900, 1200, 3), np.uint8)),  # more than L tokens at native size
        example(np.zeros((20, 20, 3), np.uint8), bbox=[[-0.5, 0.1, 0.5, 1.5]]),  # box outside
    ]
    config = small_config(num_epochs=1, shuffle=False)
    config.resolution.kind = "native"
    iterator = iter(pipeline.make_dataset(bad, config, train=True))
    batches = list(iterator)
    assert sum(int(b["example_valid"].sum()) for b in batches) == len(bad)
    counts = iterator.stats
    assert counts["thin_images_stretched"] == 1
    assert counts["grayscale_to_rgb"] == 1
    assert counts["alpha_dropped"] == 1
    assert counts["scaled_16bit"] == 1
    assert counts["examples_resized"] == 2  # the 1 x 4000 and the 900 x 1200 image
    assert counts["annotations_clipped"] == 1
    assert all(int(np.prod(g)) <= 64 for b in batches for g in b["image_grid"].reshape(-1, 2))


def test_zero_size_image_raises_naming_the_example():
    source = [example(np.zeros((8, 8, 3), np.uint8)), example(np.zeros((0, 8, 3), np.uint8))]
    dataset = pipeline.make_dataset(source, small_config(shuffle=False), train=True)
    with pytest.raises(ValueError, match="Example 1: image of zero size"):
        next(iter(dataset))


def test_inspect_measures_packing_and_draws_rows(tmp_path):
    from navit_seq import inspect

    config = small_config()
    source = inspect.SyntheticImages([(30, 50), (64, 20), (8, 8), (100, 100)] * 5)
    summary, first = inspect.measure(source, config, train=True, num_batches=3)
    assert summary["examples_dropped"] == 0 and summary["batches"] == 4
    assert 0.0 <= summary["padding_fraction"] < 1.0
    assert 1 <= summary["images_per_seq_min"] <= summary["images_per_seq_mean"]
    assert summary["images_per_seq_max"] <= config.max_examples_per_seq
    inspect.draw_rows(first, config.patch_size, 2, tmp_path / "rows.png")
    assert (tmp_path / "rows.png").stat().st_size > 0


def test_scenes_epoch_packs_every_example_once_with_its_labels(scenes_data_dir):
    from navit_seq.data import sources

    source = sources.data_source("scenes", "train", scenes_data_dir)
    config = small_config(num_epochs=1)
    config.update(name="scenes", data_dir=scenes_data_dir)
    config.task.num_classes = len(sources.class_names("scenes", scenes_data_dir))
    config.token_drop.update(kind="beta", d_mean=0.3, d_max=0.6)
    for train in (True, False):
        iterator = iter(pipeline.make_dataset(source, config, train=train))
        seen = []
        for batch in iterator:
            for row, slot in zip(*np.nonzero(batch["example_valid"]), strict=True):
                example = source[batch["example_id"][row, slot]]
                labels = np.zeros(config.task.num_classes, np.float32)
                labels[example["objects"]["label"]] = 1
                np.testing.assert_array_equal(batch["targets"]["labels"][row, slot], labels)
                np.testing.assert_array_equal(
                    batch["original_size"][row, slot], example["image"].shape[:2]
                )
                seen.append(int(batch["example_id"][row, slot]))
        assert sorted(seen) == list(range(len(source)))
        assert (iterator.stats["tokens_dropped"] > 0) == train


def test_model_patch_size_must_match_the_data_and_the_error_names_both_fields():
    data = pipeline.default_data_config()
    pipeline.check_model_patch_size(data.patch_size, data, "config.model.patch_size")
    with pytest.raises(ValueError, match=r"config.model.image.patch_size=8 differs from "):
        pipeline.check_model_patch_size(8, data, "config.model.image.patch_size")


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_training_flips_examples_with_the_configured_probability(probability):
    from navit_seq.data import patches

    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (16, 1, 3))  # x -> brighter
    config = small_config(num_epochs=1, shuffle=False)
    config.resolution.kind = "native"
    config.augment.flip_left_right = probability
    iterator = iter(pipeline.make_dataset([example(ramp)] * 6, config, train=True))
    batches = list(iterator)
    assert iterator.stats["flipped_left_right"] == int(6 * probability)
    batch = batches[0]
    tokens = batch["segment_ids"][0] == 1
    image = patches.unpatchify(
        batch["patches"][0][tokens], batch["patch_coords"][0][tokens], batch["image_grid"][0, 0], 8
    )
    np.testing.assert_array_equal(image, ramp[:, ::-1] if probability else ramp)


def test_eval_side_fixes_every_longer_side_and_zero_keeps_the_token_budget(source):
    def eval_grids(**overrides):
        config = small_config(**overrides)
        grids = []
        for batch in pipeline.make_dataset(source, config, train=False):
            valid = batch["example_valid"].reshape(-1)
            grids += [tuple(g) for g in batch["image_grid"].reshape(-1, 2)[valid]]
        return grids

    fixed = eval_grids(eval_side=32)  # 32 px at patch 8: 4 patches along the longer side
    assert len(fixed) == len(source) and {max(grid) for grid in fixed} == {4}
    budget = eval_grids(eval_side=0)
    assert all(rows * cols <= 64 for rows, cols in budget) and max(map(max, budget)) > 4
    with pytest.raises(ValueError, match="data.eval_side=-1"):
        eval_grids(eval_side=-1)


def test_cached_source_gives_the_same_batches_over_several_epochs(scenes_data_dir):
    """Decoded examples kept in memory (data.source_cache_mb) change no batch: nothing
    downstream (flips, keypoint crops, the four task codecs) writes into a cached example."""
    from navit_seq import config_utils

    config = config_utils.load_config_file(
        f"configs/pix2seq_scenes.py:data_dir={scenes_data_dir}"
    ).data
    config.update(num_workers=0, batch_size=4, mixing="data")  # per example
    config.augment.flip_left_right = 0.5

    def batches(cache_mb: int) -> list[dict]:
        config.source_cache_mb = cache_mb
        iterator = iter(pipeline.split_dataset(config, "train", train=True))
        return [next(iterator) for _ in range(12)]  # 24 examples: more than two epochs

    for want, got in zip(batches(0), batches(64), strict=True):
        for key in ("patches", "example_id", "decoder_input", "decoder_target", "task_id"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
