"""Task registry: the four sequence codecs from config, and bad input counted end to end."""

import ml_collections
import numpy as np
import pytest

from navit_seq import pipeline, tasks
from navit_seq.data import sources
from navit_seq.data.text import Tokenizer
from navit_seq.tasks import captioning, detection, keypoints, segmentation

CODECS = {
    "detection": (1, detection.DetectionTask),
    "segmentation": (2, segmentation.SegmentationTask),
    "keypoints": (3, keypoints.KeypointTask),
    "captioning": (4, captioning.CaptioningTask),
}
ALL_TASKS = tuple((name, 1.0) for name in CODECS)


def task_config(data_dir, name, **options):
    return ml_collections.ConfigDict(
        {"name": name, "dataset": "scenes", "data_dir": data_dir, "seq_len": 48, **options}
    )


@pytest.mark.parametrize("name", list(CODECS))
def test_sequence_task_is_built_from_config_with_the_datasets_classes_and_tokenizer(
    scenes_data_dir, name
):
    task = tasks.get_task(task_config(scenes_data_dir, name))
    task_id, codec_class = CODECS[name]
    assert task.task_id == task_id and isinstance(task.codec, codec_class)
    assert task.task_id < tasks.NUM_TASK_IDS  # a per-task model table has a row for it
    assert task.codec.seq_len == 48
    tokenizer = Tokenizer(sources.sentencepiece_model("scenes", scenes_data_dir))
    assert task.vocab.num_classes == len(sources.class_names("scenes", scenes_data_dir))
    assert task.vocab.text_vocab_size == tokenizer.vocab_size  # one output width for all tasks


def test_task_ids_are_unique_and_fill_0_to_num_task_ids():
    from navit_seq.tasks.classification import ClassificationTask
    from navit_seq.tasks.image_text import ImageTextTask

    ids = {ClassificationTask.task_id, ImageTextTask.task_id, *(i for i, _ in CODECS.values())}
    assert ids == set(range(tasks.NUM_TASK_IDS))  # unique, and no id without a task


def test_shared_and_per_task_options_reach_the_codec(scenes_data_dir):
    config = task_config(scenes_data_dir, "keypoints", end_weight=0.3, num_bins=500)
    config.keypoints = {"max_instances": 7}
    codec = tasks.get_task(config).codec
    assert (codec.max_instances, codec.end_weight, codec.vocab.num_bins) == (7, 0.3, 500)


def test_unknown_per_task_option_raises_naming_it(scenes_data_dir):
    config = task_config(scenes_data_dir, "detection")
    config.detection = {"max_polygons": 3}
    with pytest.raises(ValueError, match=r"data.task.detection has options \['max_polygons'\]"):
        tasks.get_task(config)


def test_missing_decoder_length_raises_naming_the_field(scenes_data_dir):
    config = task_config(scenes_data_dir, "captioning")
    del config["seq_len"]
    with pytest.raises(ValueError, match="data.task.seq_len is not set"):
        tasks.get_task(config)


def test_encode_gives_the_codecs_rows_as_decoder_rows_and_prefixed_stats(scenes_data_dir):
    task = tasks.get_task(task_config(scenes_data_dir, "segmentation"))
    example = sources.data_source("scenes", "validation", scenes_data_dir)[0]
    rows, stats = task.codec.encode(example, training=False)
    targets, counts = task.encode(example, training=False, rng=np.random.default_rng(0))
    group = targets["decoder_rows"]
    np.testing.assert_array_equal(group["decoder_input"], rows["input_tokens"])
    np.testing.assert_array_equal(group["decoder_target"], rows["target_tokens"])
    np.testing.assert_array_equal(group["decoder_weights"], rows["token_weights"])
    np.testing.assert_array_equal(group["row_instance"], rows["instance_index"])
    assert (group["decoder_prompt_length"] == 6).all()
    assert counts == {f"segmentation/{key}": value for key, value in stats.items()}


def bad_examples(good: dict) -> list[dict]:
    """Examples with one kind of bad input each, on the pixels of a good one."""
    image = good["image"]
    person_kp = np.zeros((1, 17, 3), np.float32)  # every keypoint unlabelled

    def example(labels, bbox, keypoints=None, polygons=(), captions=("a scene.",)):
        count = len(labels)
        sizes = [len(p) for p in polygons]
        return {
            "image": image,
            "image_id": np.int64(0),
            "objects": {
                "bbox": np.asarray(bbox, np.float32).reshape(count, 4),
                "label": np.asarray(labels, np.int64),
                "is_crowd": np.zeros(count, bool),
                "keypoints": np.zeros((count, 17, 3), np.float32)
                if keypoints is None
                else keypoints,
                # Every object but the last owns one polygon; the rest go to the last one.
                "num_polygons": np.asarray(
                    [min(1, len(polygons))] * (count - 1) + [max(0, len(polygons) - count + 1)]
                    if count
                    else [],
                    np.int32,
                ),
            },
            "polygon_points": np.concatenate([np.asarray(p, np.float32) for p in polygons])
            if polygons
            else np.zeros((0, 2), np.float32),
            "polygon_sizes": np.asarray(sizes, np.int32),
            "captions": np.asarray(list(captions), object),
        }

    box = [0.2, 0.2, 0.6, 0.6]
    square = [[0.2, 0.2], [0.2, 0.6], [0.6, 0.6], [0.6, 0.2]]
    return [
        example([], np.zeros((0, 4)), captions=()),  # no objects, no caption
        example([1] * 12, [box] * 12, polygons=[square] * 12),  # more objects than fit
        example([1], [box], polygons=[[[0.2, 0.2], [0.6, 0.6]]]),  # a 2-point polygon
        example([0], [box], keypoints=person_kp),  # a person with every keypoint invisible
        example([1], [box], polygons=[square], captions=("", "   ")),  # empty captions
        example([99], [box], polygons=[square]),  # an unknown class id
    ]


@pytest.fixture(scope="module")
def epoch_stats(scenes_data_dir):
    """Counters of one evaluation epoch of all four tasks: good records, then good + bad."""
    good = [sources.data_source("scenes", "validation", scenes_data_dir)[i] for i in range(4)]
    config = pipeline.default_data_config()
    config.update(data_dir=scenes_data_dir, patch_size=8, seq_len=64, batch_size=4, num_workers=0)
    config.update(max_examples_per_seq=4, max_rows_per_seq=8, eval_max_tokens=64, tasks=ALL_TASKS)
    config.task = {"name": "detection", "seq_len": 48, "max_instances": 10}

    def run(source):
        iterator = iter(pipeline.make_dataset(source, config, train=False))
        task_ids = {int(t) for b in iterator for t in b["task_id"][b["example_valid"]]}
        return task_ids, iterator.stats

    return run(good), run(good + bad_examples(good[0]))


def test_all_four_tasks_come_out_of_the_pipeline(epoch_stats):
    (good_task_ids, _), (task_ids, _) = epoch_stats
    assert good_task_ids == task_ids == {1, 2, 3, 4}


def test_bad_input_is_counted_per_task_never_raised(epoch_stats):
    (_, good), (_, mixed) = epoch_stats
    added = {key: mixed.get(key, 0) - good.get(key, 0) for key in mixed}
    expected = {
        "detection/examples": 6,
        "detection/no_objects": 2,  # no objects; unknown class (still a row: [det] END)
        "detection/objects_truncated": 12 - 9,  # (48 - 1) // 5 = 9 objects fit a row
        "detection/unknown_class": 1,
        "segmentation/no_instances": 4,  # no objects, 2-point polygon, person, unknown class
        "segmentation/instances_truncated": 12 - 10,  # max_instances = 10
        "segmentation/polygons_dropped": 1,
        "segmentation/unknown_class": 1,
        "keypoints/no_keypoints": 12 + 3,  # the all-invisible person and objects without any
        "keypoints/unknown_class": 1,
        "keypoints/no_instances": 6,
        "captioning/no_caption": 2,
        "captioning/empty_captions": 2,
        "decoder_rows_truncated": 10 - 8,  # 10 segmentation rows, max_rows_per_seq = 8
        "images_without_decoder_rows": 4 + 2,  # segmentation and captioning images left out
    }
    assert {key: added[key] for key in expected} == expected
