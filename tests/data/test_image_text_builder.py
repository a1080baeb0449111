"""Image-text folder builder: stored pixels and captions, the shared example structure read by
`sources`, counted skips for missing/corrupt images and blank captions, clear errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from navit_seq.data import sources, text
from navit_seq.data.builders import image_text

NAME = "pairs"


def write_lines(path, records) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def make_folder(root) -> dict[str, np.ndarray]:
    """A folder with good, re-encoded, corrupt and missing images; returns the stored pixels."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "images")
    pixels = {
        "images/rgb.png": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
        "images/grey.png": rng.integers(0, 256, (16, 12), dtype=np.uint8),
        "images/photo.jpg": rng.integers(0, 256, (24, 8, 3), dtype=np.uint8),
        "images/palette.gif": rng.integers(0, 4, (10, 14), dtype=np.uint8),
    }
    for path, array in pixels.items():
        image = Image.fromarray(array)
        if path.endswith(".gif"):
            image = image.convert("P")
        image.save(root / path)
    (root / "images/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    write_lines(
        root / "captions_train.jsonl",
        [
            {"image": "images/rgb.png", "caption": "a red square"},
            {"image": "images/grey.png", "captions": ["a grey thing", "  "], "id": 70},
            {"image": "images/rgb.png", "caption": " noisy pixels "},  # merged into rgb.png
            "",  # blank lines are ignored
            {"image": "images/photo.jpg", "caption": "a tall photo"},
            {"image": "images/palette.gif", "caption": "four colours"},
            {"image": "images/corrupt.jpg", "caption": "never stored"},
            {"image": "images/missing.jpg", "caption": "no file"},
            {"image": "images/photo.jpg", "captions": []},
            {"image": "images/blank.jpg", "caption": ""},  # no caption left: skipped first
        ],
    )
    write_lines(root / "captions_val.jsonl", [{"image": "images/rgb.png", "caption": "held out"}])
    return pixels


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs_folder")
    pixels = make_folder(root)
    data_dir = str(tmp_path_factory.mktemp("pairs_data"))
    report = image_text.build(str(root), data_dir, name=NAME, vocab_size=40)
    return root, pixels, data_dir, report


def examples_by_id(data_dir: str, split: str) -> dict[int, dict]:
    source = sources.data_source(NAME, split, data_dir)
    return {int(e["image_id"]): e for e in (source[i] for i in range(len(source)))}


def test_stored_examples_hold_the_pixels_and_merged_captions(built):
    _, pixels, data_dir, _ = built
    examples = examples_by_id(data_dir, "train")
    # ids: order of first appearance (rgb 0, grey given 70, photo 2, palette 3).
    assert sorted(examples) == [0, 2, 3, 70]
    np.testing.assert_array_equal(examples[0]["image"], pixels["images/rgb.png"])
    assert list(examples[0]["captions"]) == ["a red square", "noisy pixels"]
    grey = np.repeat(pixels["images/grey.png"][..., None], 3, axis=-1)
    np.testing.assert_array_equal(examples[70]["image"], grey)
    assert list(examples[70]["captions"]) == ["a grey thing"]
    assert examples[2]["image"].shape == (24, 8, 3)  # JPEG: lossy, the size is kept
    palette = np.asarray(Image.open(built[0] / "images/palette.gif").convert("RGB"))
    np.testing.assert_array_equal(examples[3]["image"], palette)
    assert list(examples_by_id(data_dir, "val")[0]["captions"]) == ["held out"]


def test_examples_have_the_shared_structure_with_no_objects(built):
    _, _, data_dir, _ = built
    example = examples_by_id(data_dir, "train")[0]
    assert set(example) == {
        "image", "image_id", "objects", "polygon_points", "polygon_sizes", "captions",
    }  # fmt: skip
    assert example["objects"]["bbox"].shape == (0, 4)
    assert example["objects"]["keypoints"].shape == (0, 17, 3)
    assert example["objects"]["label"].dtype == np.int64 and len(example["objects"]["phrase"]) == 0
    assert example["polygon_points"].shape == (0, 2) and example["captions"].dtype == object
    assert sources.class_names(NAME, data_dir) == []


def test_report_counts_every_skip_and_conversion(built):
    _, _, _, report = built
    train = report["splits"]["train"]
    assert train["images"] == 4 and train["captions"] == 5
    assert train["skipped"] == {
        "corrupt_image": 1, "empty_caption": 2, "image_without_caption": 1, "missing_image": 1,
    }  # fmt: skip
    assert train["adjusted"] == {"reencoded_image": 1}
    assert train["example_paths"]["corrupt_image"] == ["images/corrupt.jpg"]
    assert train["example_paths"]["missing_image"] == ["images/missing.jpg"]
    assert report["splits"]["val"]["images"] == 1


def test_tokenizer_is_trained_on_the_training_captions(built):
    _, _, data_dir, _ = built
    tokenizer = text.Tokenizer(sources.sentencepiece_model(NAME, data_dir))
    assert tokenizer.decode(tokenizer.encode("a red square")) == "a red square"


def test_second_build_reuses_the_dataset(built):
    root, _, data_dir, report = built
    again = image_text.build(str(root), data_dir, name=NAME, vocab_size=40)
    assert again["already_built"] and not report["already_built"]
    assert again["splits"] == report["splits"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"captions_train.jsonl:2: not valid JSON"),
        ('["images/a.png"]', r":2: each line must be an object with an \"image\""),
        ('{"image": "images/a.png"}', r":2: no 'caption' \(a string\) or 'captions'"),
        ('{"image": "images/a.png", "caption": 3}', r":2: 'caption' must be a string"),
        ('{"image": "images/a.png", "caption": "x", "id": 5}', r":2: image .* has id 5 here but 4"),
    ],
)  # fmt: skip
def test_bad_lines_raise_naming_the_file_and_line(tmp_path, line, message):
    os.makedirs(tmp_path / "images")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images/a.png")
    first = {"image": "images/a.png", "caption": "ok", "id": 4}
    write_lines(tmp_path / "captions_train.jsonl", [first, line])
    with pytest.raises(image_text.ImageTextFormatError, match=message):
        image_text.build(str(tmp_path), str(tmp_path / "data"), name=NAME)


def test_two_images_with_one_id_raise(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    records = [{"image": "a.png", "caption": "x", "id": 1}, {"image": "b.png", "caption": "y"}]
    write_lines(tmp_path / "captions_train.jsonl", records)  # b.png's default id is 1
    with pytest.raises(image_text.ImageTextFormatError, match="id 1 names both 'a.png'"):
        image_text.build(str(tmp_path), str(tmp_path / "data"), name=NAME)


def test_folder_without_caption_files_raises_showing_the_format(tmp_path):
    with pytest.raises(image_text.ImageTextFormatError, match="captions_train.jsonl"):
        image_text.build(str(tmp_path), str(tmp_path / "data"), name=NAME)


def test_split_with_only_missing_images_raises_before_writing(tmp_path):
    write_lines(tmp_path / "captions_train.jsonl", [{"image": "gone.jpg", "caption": "x"}])
    with pytest.raises(image_text.ImageTextFormatError, match="'missing_image': 1"):
        image_text.build(str(tmp_path), str(tmp_path / "data"), name=NAME)


def test_split_with_only_corrupt_images_raises_and_leaves_no_dataset(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    write_lines(tmp_path / "captions_train.jsonl", [{"image": "bad.jpg", "caption": "x"}])
    with pytest.raises(image_text.ImageTextFormatError, match="every image was skipped"):
        image_text.build(str(tmp_path), str(tmp_path / "data"), name=NAME)
    builder = image_text.image_text_builder(str(tmp_path), str(tmp_path / "data"), name=NAME)
    assert not builder.is_prepared()


def test_build_command_converts_the_folder_and_prints_where(built, tmp_path, capsys):
    from navit_seq.data import build

    root, *_ = built
    assert build.main(["image-text", "--folder", str(root), "--data-dir", str(tmp_path)]) == 0
    assert f"'image_text' in {tmp_path}" in capsys.readouterr().out
    assert len(sources.data_source("image_text", "train", str(tmp_path))) > 0
