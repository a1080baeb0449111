"""Ragged groups in the packer: decoder rows and caption text per row, crops, restore."""

import json

import grain
import numpy as np
import pytest
from PIL import Image
from test_packing import element

from navit_seq import pipeline
from navit_seq.data import packing, patches, sources
from navit_seq.tasks import image_text, keypoints, sequence

T = 6  # decoder row length in the hand-made elements


def rows_group(stream_index: int, num_rows: int) -> dict:
    """Decoder rows whose tokens name their image and row: input[r] = 100 * index + r."""
    tokens = 100 * stream_index + np.arange(num_rows, dtype=np.int32)[:, None] + np.zeros(T, int)
    return {
        "decoder_input": tokens.astype(np.int32),
        "decoder_target": (tokens + 1).astype(np.int32),
        "decoder_weights": np.ones((num_rows, T), np.float32),
        "decoder_prompt_length": np.ones(num_rows, np.int32),
        "row_instance": np.arange(num_rows, dtype=np.int32),
    }


def image(stream_index: int, num_tokens: int, ragged: dict) -> dict:
    """test_packing's hand-made element (task 1) carrying ragged groups (decoder rows, text)."""
    return {**element(stream_index, num_tokens, task_id=1), "ragged": ragged}


def packer(elements, ragged_specs, **overrides):
    kwargs = dict(
        batch_size=2, seq_len=64, max_examples_per_seq=4, buffer_size=8, patch_dim=3, target_spec={}
    )
    kwargs.update(overrides)
    parent = grain.MapDataset.source(elements).to_iter_dataset()
    return packing.PackIterDataset(
        parent, elements.__getitem__, ragged_specs=ragged_specs, **kwargs
    )


def row_elements(num_rows):
    return [image(i, 4, {"decoder_rows": rows_group(i, n)}) for i, n in enumerate(num_rows)]


def rows_of(batch, row, slot):
    """The decoder inputs packed for image slot `slot` of batch row `row`."""
    return batch["decoder_input"][row][batch["row_slot"][row] == slot]


def test_rows_fill_first_fit_under_the_row_capacity_and_the_rest_wait():
    spec = sequence.decoder_rows_spec(T, max_rows_per_seq=4)
    batches = list(packer(row_elements([3, 2, 1, 2, 3]), [spec]))
    # Batch 0: 3 rows -> row 0; 2 -> row 1; 1 -> row 0 (4 rows: full); 2 -> row 1 (4: full).
    # Image 4 (3 rows) fits nowhere and waits for batch 1.
    placed = [
        [b["example_id"][r][b["example_valid"][r]].tolist() for r in range(2)] for b in batches
    ]
    assert placed == [[[0, 2], [1, 3]], [[4], []]]
    first = batches[0]
    np.testing.assert_array_equal(first["row_slot"], [[0, 0, 0, 1], [0, 0, 1, 1]])
    for row, slot, index in [(0, 0, 0), (0, 1, 2), (1, 0, 1), (1, 1, 3)]:
        expected = rows_group(index, (3, 2, 1, 2)[index])["decoder_input"]
        np.testing.assert_array_equal(rows_of(first, row, slot), expected)
    np.testing.assert_array_equal(batches[1]["row_slot"], [[0, 0, 0, -1], [-1, -1, -1, -1]])


def test_padding_rows_are_zero_with_row_slot_minus_one():
    spec = sequence.decoder_rows_spec(T, max_rows_per_seq=4)
    (batch,) = list(packer(row_elements([1]), [spec]))
    padding = batch["row_slot"] == -1
    assert padding.sum() == 7
    for key in ("decoder_input", "decoder_target", "decoder_weights", "row_instance"):
        assert not batch[key][padding].any(), key


def test_image_with_more_rows_than_capacity_keeps_the_first_and_counts_the_rest():
    spec = sequence.decoder_rows_spec(T, max_rows_per_seq=3)
    iterator = iter(packer(row_elements([5, 1]), [spec]))
    batch = next(iterator)
    np.testing.assert_array_equal(rows_of(batch, 0, 0), rows_group(0, 3)["decoder_input"])
    assert iterator.stats["decoder_rows_truncated"] == 2
    assert iterator.stats["decoder_rows_packed"] == 4


def test_image_without_rows_is_skipped_and_counted():
    spec = sequence.decoder_rows_spec(T, max_rows_per_seq=3)
    iterator = iter(packer(row_elements([1, 0, 2]), [spec]))
    batches = list(iterator)
    ids = np.concatenate([b["example_id"][b["example_valid"]] for b in batches])
    assert sorted(ids.tolist()) == [0, 2]
    assert iterator.stats["images_without_decoder_rows"] == 1
    assert iterator.stats["examples_read"] == 3


def test_captions_pack_into_text_tokens_with_segment_ids_of_their_slots():
    spec = image_text.text_spec(text_seq_len=10)
    lengths = [4, 3, 5, 2, 6]
    elements = [
        image(i, 4, {"text": {"text_tokens": np.arange(n, dtype=np.int32) + 10 * i}})
        for i, n in enumerate(lengths)
    ]
    batches = list(packer(elements, [spec]))
    seen = []
    for batch in batches:
        assert batch["text_tokens"].shape == (2, 10)
        for row in range(2):
            segments = batch["text_segment_ids"][row]
            used = segments[segments > 0]
            assert np.all(np.diff(used) >= 0)  # captions back to back in slot order
            assert (
                np.all(segments[len(used) :] == 0)
                and not batch["text_tokens"][row, len(used) :].any()
            )
            for slot in np.flatnonzero(batch["example_valid"][row]):
                index = int(batch["example_id"][row, slot])
                expected = elements[index]["ragged"]["text"]["text_tokens"]
                np.testing.assert_array_equal(
                    batch["text_tokens"][row][segments == slot + 1], expected
                )
                seen.append(index)
    assert sorted(seen) == list(range(5))
    # First fit under 10 text tokens per row: 4 + 3 -> row 0 (then 5 does not fit), 5 -> row 1,
    # 2 -> row 0 (9), 6 waits.
    assert [b["example_id"][b["example_valid"]].tolist() for b in batches] == [[0, 1, 3, 2], [4]]


def crop_elements():
    """Examples of 1-3 images (as crops arrive), one decoder row each."""
    elements = []
    for i, num_images in enumerate([2, 1, 3, 2, 1, 3, 2]):
        images = [
            {**image(i, 7 + part, {"decoder_rows": rows_group(i, 1)}), "example_id": np.int64(i)}
            for part in range(num_images)
        ]
        elements.append({"images": images, "counts": {"crops": num_images}, "stream_index": i})
    return elements


def test_examples_of_several_images_pack_every_image_and_count_once():
    spec = sequence.decoder_rows_spec(T, max_rows_per_seq=2)
    iterator = iter(packer(crop_elements(), [spec], max_examples_per_seq=2, seq_len=20))
    sizes = [
        (int(b["example_id"][r, s]), int(b["image_grid"][r, s, 1]))
        for b in iterator
        for r, s in zip(*np.nonzero(b["example_valid"]), strict=True)
    ]
    expected = [(i, 7 + part) for i, n in enumerate([2, 1, 3, 2, 1, 3, 2]) for part in range(n)]
    assert sorted(sizes) == expected
    assert iterator.stats["crops"] == 14 and iterator.stats["examples_packed"] == 14


def test_restore_with_buffered_crops_gives_the_same_next_batches():
    spec = sequence.decoder_rows_spec(T, max_rows_per_seq=2)
    dataset = packer(crop_elements(), [spec], max_examples_per_seq=2, seq_len=20, batch_size=1)
    iterator = iter(dataset)
    next(iterator)
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    assert any(state["buffered_image_indices"])  # a later crop of an example is waiting
    expected = list(iterator)
    restored = iter(dataset)
    restored.set_state(state)
    got = list(restored)
    assert len(got) == len(expected)
    for want, have in zip(expected, got, strict=True):
        for key in want:
            np.testing.assert_array_equal(have[key], want[key], err_msg=key)


@pytest.fixture(scope="module")
def keypoint_epoch(scenes_data_dir):
    """One evaluation epoch of the keypoint task on the scene dataset."""
    config = pipeline.default_data_config()
    config.update(data_dir=scenes_data_dir, patch_size=8, seq_len=64, batch_size=4, num_workers=0)
    config.update(max_examples_per_seq=4, max_rows_per_seq=4, eval_max_tokens=64)
    config.task = {"name": "keypoints", "seq_len": 48}
    source = sources.data_source("scenes", "validation", scenes_data_dir)
    iterator = iter(pipeline.make_dataset(source, config, train=False))
    return source, list(iterator), iterator.stats


def test_keypoint_rows_each_see_their_person_crop_as_one_packed_image(keypoint_epoch):
    source, batches, stats = keypoint_epoch
    assert stats["keypoints/instances"] > 0
    assert stats["examples_packed"] == stats["keypoints/instances"]
    for batch in batches:
        for row, slot in zip(*np.nonzero(batch["example_valid"]), strict=True):
            assert (batch["row_slot"][row] == slot).sum() == 1  # one row per crop image
            crop_box = batch["targets"]["crop_box"][row, slot]
            stored = source[int(batch["example_id"][row, slot])]["image"]
            # Independent reference: cut the crop's pixels by hand, resize to the packed size.
            height, width = stored.shape[:2]
            y0, x0, y1, x1 = np.round(crop_box * [height, width, height, width]).astype(int)
            np.testing.assert_array_equal(batch["original_size"][row, slot], [y1 - y0, x1 - x0])
            size_h, size_w = batch["image_size"][row, slot]
            expected = np.asarray(
                Image.fromarray(stored[y0:y1, x0:x1]).resize(
                    (int(size_w), int(size_h)), Image.Resampling.BILINEAR
                )
            )
            positions = np.flatnonzero(batch["segment_ids"][row] == slot + 1)
            recovered = patches.unpatchify(
                batch["patches"][row, positions],
                batch["patch_coords"][row, positions],
                batch["image_grid"][row, slot],
                8,
            )
            np.testing.assert_array_equal(recovered, expected)


def test_keypoint_crop_box_is_the_one_the_codec_encoded_the_row_in(keypoint_epoch, scenes_data_dir):
    source, batches, _ = keypoint_epoch
    codec = keypoints.KeypointTask(sequence.vocab_from_config(_task_config(scenes_data_dir)), 48)
    for batch in batches:
        for row, slot in zip(*np.nonzero(batch["example_valid"]), strict=True):
            example = source[int(batch["example_id"][row, slot])]
            instance = int(batch["row_instance"][row][batch["row_slot"][row] == slot][0])
            box = example["objects"]["bbox"][instance]
            expected = codec.crop_box(box, example["image"].shape[:2])
            np.testing.assert_allclose(batch["targets"]["crop_box"][row, slot], expected)


def _task_config(data_dir):
    import ml_collections

    return ml_collections.ConfigDict(
        {"name": "keypoints", "dataset": "scenes", "data_dir": data_dir}
    )
