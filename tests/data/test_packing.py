"""The first-fit packer: lossless, consistent, exactly-once, fixed shapes, exact restore."""

import json

import grain
import numpy as np
import pytest
from PIL import Image

from navit_seq import pipeline
from navit_seq.data import packing, patches, token_drop

PATCH, SEQ_LEN, ROWS, SLOTS = 8, 64, 4, 4
NUM_IMAGES, NUM_CLASSES = 60, 6


def small_config(**overrides):
    config = pipeline.default_data_config()
    config.update(
        patch_size=PATCH,
        seq_len=SEQ_LEN,
        batch_size=ROWS,
        max_examples_per_seq=SLOTS,
        pack_buffer_size=8,
        num_workers=0,
        eval_max_tokens=SEQ_LEN,
    )
    config.resolution.update(min_side=16, max_side=64)
    config.task.num_classes = NUM_CLASSES
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(NUM_IMAGES):
        height, width = rng.integers(10, 200, size=2)
        examples.append(
            {
                "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                "objects": {"label": rng.integers(0, NUM_CLASSES, rng.integers(0, 4))},
            }
        )
    return examples


@pytest.fixture(scope="module")
def epoch(source):
    """All batches of one shuffled training epoch (no token dropping)."""
    config = small_config(num_epochs=1)
    return list(pipeline.make_dataset(source, config, train=True))


def segments(batch):
    """(row, slot, token positions) of every packed image."""
    for row in range(ROWS):
        for slot in np.flatnonzero(batch["example_valid"][row]):
            yield row, slot, np.flatnonzero(batch["segment_ids"][row] == slot + 1)


def test_every_example_of_an_epoch_appears_exactly_once(epoch):
    ids = np.concatenate([b["example_id"][b["example_valid"]] for b in epoch])
    assert sorted(ids.tolist()) == list(range(NUM_IMAGES))


def test_packing_is_lossless_against_a_direct_resize(epoch, source):
    for batch in epoch:
        for row, slot, positions in segments(batch):
            example_id = batch["example_id"][row, slot]
            height, width = batch["image_size"][row, slot]
            # Independent reference: resize the stored image straight to the packed size.
            expected = np.asarray(
                Image.fromarray(source[example_id]["image"]).resize(
                    (width, height), Image.Resampling.BILINEAR
                )
            )
            recovered = patches.unpatchify(
                batch["patches"][row, positions],
                batch["patch_coords"][row, positions],
                batch["image_grid"][row, slot],
                PATCH,
            )
            np.testing.assert_array_equal(recovered, expected)
            assert len(positions) == np.prod(batch["image_grid"][row, slot])
            stored_size = source[example_id]["image"].shape[:2]
            np.testing.assert_array_equal(batch["original_size"][row, slot], stored_size)


def test_segment_ids_are_contiguous_blocks_then_padding(epoch):
    for batch in epoch:
        for row in range(ROWS):
            segment_ids = batch["segment_ids"][row]
            num_examples = int(batch["example_valid"][row].sum())
            used = segment_ids[segment_ids > 0]
            # Blocks 1, 2, ..., E in order, then only padding.
            assert np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1)
            assert set(used.tolist()) == set(range(1, num_examples + 1))
            assert np.all(segment_ids[len(used) :] == 0)
            assert batch["example_valid"][row].tolist() == [s < num_examples for s in range(SLOTS)]
            assert np.all(batch["patch_coords"][row, len(used) :] == 0)
            assert np.all(batch["example_id"][row, num_examples:] == -1)


def test_coordinates_lie_inside_their_images_grid(epoch):
    for batch in epoch:
        for row, slot, positions in segments(batch):
            coords = batch["patch_coords"][row, positions]
            grid = batch["image_grid"][row, slot]
            assert np.all(coords >= 0) and np.all(coords < grid)
            assert len(np.unique(coords, axis=0)) == len(coords)


def test_targets_are_the_examples_multi_hot_labels(epoch, source):
    for batch in epoch:
        for row, slot, _ in segments(batch):
            labels = source[batch["example_id"][row, slot]]["objects"]["label"]
            expected = np.zeros(NUM_CLASSES, np.float32)
            expected[labels] = 1
            np.testing.assert_array_equal(batch["targets"]["labels"][row, slot], expected)
        assert not batch["targets"]["labels"][~batch["example_valid"]].any()


def test_shapes_and_dtypes_are_identical_for_every_batch(epoch):
    def signature(batch):
        return [(key, value.shape, value.dtype) for key, value in sorted(_flat(batch).items())]

    assert len(epoch) > 3
    assert all(signature(b) == signature(epoch[0]) for b in epoch)
    assert epoch[0]["patches"].shape == (ROWS, SEQ_LEN, PATCH * PATCH * 3)


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def element(stream_index: int, num_tokens: int, task_id: int = 0) -> dict:
    """A hand-made per-image element of `num_tokens` tokens in a 1 x num_tokens grid."""
    return {
        "patches": np.full((num_tokens, 3), stream_index, np.uint8),
        "patch_coords": np.stack([np.zeros(num_tokens), np.arange(num_tokens)], -1).astype(
            np.int32
        ),
        "image_grid": np.array([1, num_tokens], np.int32),
        "image_size": np.array([1, num_tokens], np.int32),
        "original_size": np.array([1, num_tokens], np.int32),
        "example_id": np.int64(stream_index),
        "task_id": np.int32(task_id),
        "targets": {},
        "stream_index": stream_index,
        "counts": {},
    }


def packer(sizes, **overrides):
    elements = [element(i, n) for i, n in enumerate(sizes)]
    kwargs = dict(
        batch_size=2,
        seq_len=64,
        max_examples_per_seq=3,
        buffer_size=8,
        patch_dim=3,
        target_spec={},
    )
    kwargs.update(overrides)
    parent = grain.MapDataset.source(elements).to_iter_dataset()
    return packing.PackIterDataset(parent, elements.__getitem__, **kwargs)


def test_first_fit_fills_the_first_row_with_room_and_defers_the_rest():
    batches = list(packer([40, 30, 30, 20, 10, 64, 5]))
    # Batch 0: 40 -> row 0; 30, 30 -> row 1; 20 -> row 0 (60); 10, 64, 5 fit nowhere and wait.
    # Batch 1 starts with the waiting images, oldest first: 10 -> row 0, 64 -> row 1, 5 -> row 0.
    placed = [
        [b["example_id"][r][b["example_valid"][r]].tolist() for r in range(2)] for b in batches
    ]
    assert placed == [[[0, 3], [1, 2]], [[4, 6], [5]]]


def test_row_holds_at_most_max_examples_per_seq():
    (batch, *_) = list(packer([1] * 10, max_examples_per_seq=3))
    assert batch["example_valid"].sum(axis=1).tolist() == [3, 3]
    assert batch["segment_ids"].max() == 3


def test_packing_off_puts_one_image_per_row():
    batches = list(packer([5, 5, 5, 5, 5], packing=False))
    assert [b["example_valid"].sum(axis=1).tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]


def test_element_longer_than_the_sequence_raises_naming_it():
    with pytest.raises(ValueError, match="Example 1 has 65 tokens > seq_len=64"):
        list(packer([3, 65]))


def test_restore_after_checkpoint_gives_the_same_next_batches(source):
    config = small_config()
    config.token_drop.update(kind="beta", d_mean=0.3, d_max=0.6)
    dataset = pipeline.make_dataset(source, config, train=True)
    iterator = iter(dataset)
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    assert state["buffered_stream_indices"]  # the interesting case: images are waiting
    expected = [next(iterator) for _ in range(4)]

    restored = iter(dataset)
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(4)), strict=True):
        for key, value in _flat(want).items():
            np.testing.assert_array_equal(_flat(got)[key], value, err_msg=key)
    assert restored.stats == iterator.stats


def test_training_drops_tokens_but_evaluation_never_does(source):
    config = small_config(num_epochs=1)
    config.token_drop.update(kind="constant", rate=0.5)
    train = iter(pipeline.make_dataset(source, config, train=True))
    for batch in train:
        for row, slot, positions in segments(batch):
            grid_tokens = int(np.prod(batch["image_grid"][row, slot]))
            assert len(positions) == token_drop.num_tokens_kept(grid_tokens, 0.5)
    assert packing.summarize_stats(train.stats)["token_drop_fraction"] == pytest.approx(
        0.5, abs=0.05
    )
    evaluation = iter(pipeline.make_dataset(source, config, train=False))
    for batch in evaluation:
        for row, slot, positions in segments(batch):
            assert len(positions) == np.prod(batch["image_grid"][row, slot])
    assert evaluation.stats["tokens_dropped"] == 0
    assert evaluation.stats["examples_packed"] == NUM_IMAGES


def test_drop_rate_follows_the_schedule_at_each_batch_index(source):
    config = small_config()
    config.token_drop.update(kind="constant")
    config.token_drop.schedule.update(
        kind="sigmoid", rho_min=0.2, rho_max=0.8, mid_step=2, temperature=0.01
    )
    iterator = iter(pipeline.make_dataset(source, config, train=True))
    for step in range(5):
        batch = next(iterator)
        rate = (0.8, 0.8, 0.5, 0.2, 0.2)[step]  # a step-like decreasing schedule
        for row, slot, positions in segments(batch):
            grid_tokens = int(np.prod(batch["image_grid"][row, slot]))
            assert len(positions) == token_drop.num_tokens_kept(grid_tokens, rate)
