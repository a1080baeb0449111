"""The scene TFDS builder and the build command, on the session's tiny scene dataset."""

import glob
import os
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from navit_seq.data import build, drawing, scene_render, sources, text
from navit_seq.data.builders import scenes

SIZES = {"train": 24, "validation": 8, "heldout": 8}
BUILD_OPTIONS = {
    "train_size": 24,
    "validation_size": 8,
    "heldout_size": 8,
    "min_side": 48,
    "max_side": 320,
}  # fmt: skip  (the scenes_data_dir fixture's options, tests/conftest.py)


def _records(data_dir: str, split: str) -> list[dict]:
    source = sources.data_source("scenes", split, data_dir)
    return [source[i] for i in range(len(source))]


def _array_record_bytes(dataset_dir: str) -> dict[str, bytes]:
    files = sorted(glob.glob(os.path.join(dataset_dir, "*.array_record-*")))
    assert len(files) == 3
    return {os.path.basename(f): open(f, "rb").read() for f in files}


def _combos(records: list[dict]) -> set[tuple[str, str]]:
    """(colour, class) pairs named by the objects' phrases."""
    pairs = set()
    for record in records:
        for phrase in record["objects"]["phrase"]:
            words = re.findall(r"[a-z]+", phrase)
            colour = next(w for w in words if w in scene_render.COLOUR_NAMES)
            name = next(w for w in words if w in scene_render.CLASS_NAMES)
            pairs.add((colour, name))
    return pairs


def test_splits_have_the_configured_sizes_and_unique_image_ids(scenes_data_dir):
    image_ids = []
    for split, size in SIZES.items():
        records = _records(scenes_data_dir, split)
        assert len(records) == size
        image_ids += [int(r["image_id"]) for r in records]
    assert len(set(image_ids)) == sum(SIZES.values())


def test_stored_examples_equal_the_rendered_scenes(scenes_data_dir):
    for split in ("train", "heldout"):
        for record in _records(scenes_data_dir, split)[:4]:
            index = int(record["image_id"]) % scenes.IMAGE_ID_STRIDE
            spec = scene_render.SceneSpec(
                min_side=48, max_side=320, combos="heldout" if split == "heldout" else "seen"
            )
            rng = scene_render.scene_rng(0, split, index)
            expected = scene_render.render_scene(rng, spec).example
            assert record["image"].shape == expected["image"].shape
            # JPEG (quality 95, 4:4:4): close to the drawn pixels, not equal
            error = np.abs(record["image"].astype(int) - expected["image"].astype(int)).mean()
            assert error < 4
            assert list(record["objects"]["mask_rle"]) == list(expected["objects"]["mask_rle"])
            np.testing.assert_array_equal(record["objects"]["bbox"], expected["objects"]["bbox"])
            np.testing.assert_array_equal(
                record["objects"]["keypoints"], expected["objects"]["keypoints"]
            )
            np.testing.assert_array_equal(record["polygon_points"], expected["polygon_points"])
            np.testing.assert_array_equal(record["polygon_sizes"], expected["polygon_sizes"])
            assert list(record["captions"]) == expected["captions"]


def test_stored_masks_decode_to_the_stored_areas(scenes_data_dir):
    for record in _records(scenes_data_dir, "validation"):
        height, width = record["image"].shape[:2]
        for counts, area in zip(
            record["objects"]["mask_rle"], record["objects"]["area"], strict=True
        ):
            mask = mask_utils.decode({"size": [height, width], "counts": counts})
            assert mask.sum() == area > 0


def test_heldout_colour_shape_combinations_never_occur_in_train_or_validation(scenes_data_dir):
    heldout = _combos(_records(scenes_data_dir, "heldout"))
    seen = _combos(_records(scenes_data_dir, "train") + _records(scenes_data_dir, "validation"))
    assert heldout and seen and not heldout & seen
    combos_by_rule = {
        (scene_render.COLOUR_NAMES[colour], scene_render.CLASS_NAMES[label])
        for label, colour in scenes.heldout_combinations()
    }
    assert heldout <= combos_by_rule


def test_tokenizer_stored_with_the_dataset_encodes_its_captions_without_unknowns(
    scenes_data_dir,
):
    tokenizer = text.Tokenizer(sources.sentencepiece_model("scenes", scenes_data_dir))
    for record in _records(scenes_data_dir, "validation"):
        for caption in record["captions"]:
            ids = tokenizer.encode(caption)
            assert text.UNK_ID not in ids
            assert tokenizer.decode(ids) == caption


def test_build_report_counts_objects_and_hidden_removals(scenes_data_dir):
    report = scenes.read_report(sources.dataset_dir("scenes", scenes_data_dir))
    assert report["sizes"] == SIZES
    for split in SIZES:
        stored = sum(len(r["objects"]["label"]) for r in _records(scenes_data_dir, split))
        assert report["objects"][split] == stored
        assert report["objects_removed_as_hidden"][split] >= 0
    assert len(report["heldout_combinations"]) == len(scene_render.CLASS_NAMES)


def test_same_seed_rebuilt_with_a_worker_pool_gives_identical_files(
    scenes_data_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(scenes, "MIN_EXAMPLES_FOR_POOL", 1)  # use the pool even for tiny splits
    rebuilt = build.build_scenes(tmp_path, num_workers=2, **BUILD_OPTIONS)
    original = sources.dataset_dir("scenes", scenes_data_dir)
    assert _array_record_bytes(rebuilt) == _array_record_bytes(original)
    with open(os.path.join(rebuilt, text.SENTENCEPIECE_FILENAME), "rb") as a:
        with open(os.path.join(original, text.SENTENCEPIECE_FILENAME), "rb") as b:
            assert a.read() == b.read()


def test_another_seed_gives_other_scenes(tmp_path):
    options = {**BUILD_OPTIONS, "train_size": 4, "validation_size": 1, "heldout_size": 1}
    first = build.build_scenes(tmp_path / "a", num_workers=1, seed=1, **options)
    second = build.build_scenes(tmp_path / "b", num_workers=1, seed=2, **options)
    assert _array_record_bytes(first) != _array_record_bytes(second)


def test_build_scenes_reuses_a_matching_build_and_refuses_a_different_one(scenes_data_dir):
    dataset_dir = sources.dataset_dir("scenes", scenes_data_dir)
    stamp = os.path.getmtime(os.path.join(dataset_dir, scenes.REPORT_FILE))
    assert build.build_scenes(scenes_data_dir, **BUILD_OPTIONS) == dataset_dir
    assert os.path.getmtime(os.path.join(dataset_dir, scenes.REPORT_FILE)) == stamp
    with pytest.raises(ValueError, match="another --data-dir"):
        build.build_scenes(scenes_data_dir, **{**BUILD_OPTIONS, "seed": 5})
    with pytest.raises(TypeError, match="unknown options"):
        build.build_scenes(scenes_data_dir, train_sizes=3)


def test_bad_builder_sizes_are_refused_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="validation_size=-1"):
        scenes.Scenes(data_dir=str(tmp_path), validation_size=-1)
    with pytest.raises(ValueError, match="min_side"):
        scenes.Scenes(data_dir=str(tmp_path), min_side=300, max_side=100)


def test_show_prints_examples_and_saves_an_annotated_picture(scenes_data_dir, tmp_path, capsys):
    picture = build.print_sample("scenes", "train", scenes_data_dir, 5, str(tmp_path / "s.png"))
    printed = capsys.readouterr().out
    assert printed.count("caption:") == 5 * 5 and "saved a picture" in printed
    from PIL import Image

    with Image.open(picture) as image:
        assert image.size == (4 * drawing.GRID_CELL_SIDE, 2 * drawing.GRID_CELL_SIDE)


def test_command_line_builds_then_reports_where_it_wrote(scenes_data_dir, capsys):
    arguments = ["scenes", "--data-dir", scenes_data_dir]
    for option, value in BUILD_OPTIONS.items():
        arguments += [f"--{option.replace('_', '-')}", str(value)]
    assert build.main(arguments) == 0
    assert f"scene dataset in {sources.dataset_dir('scenes', scenes_data_dir)}" in (
        capsys.readouterr().out
    )
    with pytest.raises(SystemExit) as help_exit:
        build.main(["--help"])
    assert help_exit.value.code == 0


def test_a_split_of_size_zero_is_left_out(tmp_path):
    options = {**BUILD_OPTIONS, "train_size": 2, "validation_size": 0, "heldout_size": 0}
    build.build_scenes(tmp_path, num_workers=1, **options)
    assert len(sources.data_source("scenes", "train", tmp_path)) == 2
    with pytest.raises(ValueError, match=r"its splits are \['train'\]"):
        sources.data_source("scenes", "validation", tmp_path)


def test_variants_build_under_their_own_name_with_the_scenes_they_promise(tmp_path):
    options = {"train_size": 24, "validation_size": 4, "heldout_size": 0, "max_side": 128}
    shapes_dir = build.build_scenes(tmp_path, variant="scene_shapes", **options)
    assert shapes_dir == sources.dataset_dir("scene_shapes", tmp_path)
    report = scenes.read_report(shapes_dir)
    assert report["scene_spec"]["max_objects"] == 1
    labels = []
    for example in sources.data_source("scene_shapes", "train", tmp_path):
        assert len(example["objects"]["label"]) == 1  # one object, never hidden
        height, width = example["image"].shape[:2]
        assert max(height, width) / min(height, width) <= 1.5 + 2 / min(height, width)
        labels.append(int(example["objects"]["label"][0]))
    assert len(set(labels)) >= 8  # every class equally likely: 24 draws show most of the 12
    easy_dir = build.build_scenes(tmp_path, variant="scenes_easy", **options)
    for example in sources.data_source("scenes_easy", "train", tmp_path):
        assert 1 <= len(example["objects"]["label"]) <= 3
        assert "plain" in example["captions"][0] or "background" not in example["captions"][0]
    assert scenes.read_report(easy_dir)["scene_spec"]["backgrounds"] == ["plain"]
    with pytest.raises(ValueError, match="variant='scene_shape'"):
        build.build_scenes(tmp_path, variant="scene_shape")


def test_texture_variant_names_its_classes_by_texture_and_every_task_reads_it(textures_data_dir):
    from navit_seq import pipeline

    names = list(scene_render.TEXTURE_NAMES)
    assert sources.class_names("scene_textures", textures_data_dir) == names
    report = scenes.read_report(sources.dataset_dir("scene_textures", textures_data_dir))
    assert report["scene_spec"]["fill"] == "texture" and report["class_names"] == names
    assert len(report["heldout_combinations"]) == len(names)
    for split in ("train", "heldout"):
        for example in sources.data_source("scene_textures", split, textures_data_dir):
            (label,) = example["objects"]["label"]
            (phrase,) = example["objects"]["phrase"]
            assert phrase.endswith(names[label].replace("_", " "))
            colour = scene_render.COLOUR_NAMES.index(phrase.split()[2])  # "the large red ..."
            assert (colour == scene_render.heldout_colour(label)) == (split == "heldout")
    validation = sources.data_source("scene_textures", "validation", textures_data_dir)
    config = pipeline.default_data_config()
    config.update(name="scene_textures", data_dir=textures_data_dir, patch_size=16, seq_len=256)
    config.update(batch_size=4, num_workers=0, eval_max_tokens=64, max_rows_per_seq=8)
    config.tasks = tuple((name, 1.0) for name in ("detection", "segmentation", "keypoints",
                                                  "captioning"))  # fmt: skip
    config.task = {"name": "detection", "seq_len": 48, "max_instances": 4}
    iterator = iter(pipeline.make_dataset(validation, config, train=False))
    task_ids = {int(t) for b in iterator for t in b["task_id"][b["example_valid"]]}
    assert task_ids == {1, 2, 4}  # detection, segmentation, captioning: no persons, no keypoints
    assert iterator.stats["keypoints/no_instances"] == len(validation)
