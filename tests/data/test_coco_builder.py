"""COCO-format builder: round trip against pycocotools' view of the same JSON, and bad input."""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from navit_seq.data.builders import coco

PERSON, DOG, BOTTLE = 1, 18, 44  # COCO's ids are not contiguous; neither are these
CATEGORIES = [
    {"id": BOTTLE, "name": "bottle", "supercategory": "kitchen"},
    {"id": PERSON, "name": "person", "supercategory": "person"},
    {"id": DOG, "name": "dog", "supercategory": "animal"},
]
PERSON_WITH_KEYPOINTS = {
    **CATEGORIES[1],
    "keypoints": [f"k{i}" for i in range(17)],
    "skeleton": [[1, 2]],
}


def _image(image_id: int, file_name: str, height: int, width: int) -> dict:
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def _polygon_annotation(annotation_id, image_id, category_id, polygons, **extra) -> dict:
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": polygons,
        "bbox": box,
        "area": 0.5 * box[2] * box[3],
        "iscrowd": 0,
        **extra,
    }


def _keypoints(seed: int, height: int, width: int) -> list[float]:
    rng = np.random.default_rng(seed)
    values = []
    for visibility in rng.integers(0, 3, size=17):
        x, y = (rng.uniform(0, width), rng.uniform(0, height)) if visibility else (0, 0)
        values += [round(float(x), 2), round(float(y), 2), int(visibility)]
    return values


def _crowd_rle(height: int, width: int) -> dict:
    """An uncompressed RLE (column-major run lengths) as COCO stores crowd masks."""
    mask = np.zeros((height, width), np.uint8)
    mask[5:20, 30:50] = 1
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": [height, width], "counts": counts}


def write_coco_folder(root: str) -> str:
    """A small COCO-format folder: split 'train' with all three files, 'val' with instances only.

    Covers: JPEG, greyscale JPEG, PNG and RGBA PNG images; polygons (one object with two);
    crowd masks as uncompressed and compressed RLE; keypoints merged by annotation id; an image
    without annotations; an image listed only in the captions file; a degenerate polygon, a
    box partly and a box wholly outside the image, a zero-width box, an annotation with no
    segmentation.
    """
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "annotations"))
    images = {
        "train": [
            (1, "a.jpg", 48, 64, "RGB", "JPEG"),
            (2, "b.png", 40, 30, "RGB", "PNG"),
            (3, "grey.jpg", 32, 32, "L", "JPEG"),
            (7, "rgba.png", 24, 36, "RGBA", "PNG"),
            (9, "captions_only.jpg", 20, 28, "RGB", "JPEG"),
        ],
        "val": [(5, "v.jpg", 30, 40, "RGB", "JPEG")],
    }
    for split, records in images.items():
        os.makedirs(os.path.join(root, split))
        for _, file_name, height, width, mode, image_format in records:
            channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
                os.path.join(root, split, file_name), format=image_format
            )
    records = {s: [_image(*r[:4]) for r in rs] for s, rs in images.items()}

    compressed = mask_utils.encode(
        np.asfortranarray(np.pad(np.ones((10, 10), np.uint8), ((10, 10), (15, 15))))
    )
    compressed = {"size": [30, 40], "counts": compressed["counts"].decode()}
    compressed_bbox = [15, 10, 10, 10]
    train_annotations = [
        _polygon_annotation(101, 1, PERSON, [[10, 5, 30, 5, 30, 40, 10, 40]]),
        _polygon_annotation(
            102, 1, DOG, [[40, 10, 60, 10, 50, 30], [35, 35, 45, 35, 45, 45, 35, 45]]
        ),
        {  # crowd, uncompressed RLE
            "id": 103,
            "image_id": 1,
            "category_id": PERSON,
            "segmentation": _crowd_rle(48, 64),
            "bbox": [30, 5, 20, 15],
            "area": 300.0,
            "iscrowd": 1,
        },
        # Partly outside the image: box clipped, polygon kept as given.
        _polygon_annotation(104, 2, BOTTLE, [[20, 20, 36, 20, 36, 38, 20, 38]]),
        # Degenerate polygon dropped, the other polygon kept.
        _polygon_annotation(105, 2, DOG, [[2, 2, 10, 2, 10, 10, 2, 10], [5, 5, 6, 6]]),
        # Only degenerate (zero-area) polygons: annotation skipped.
        _polygon_annotation(106, 2, DOG, [[1, 1, 5, 5, 9, 9]], bbox=[1, 1, 8, 8]),
        # Wholly outside the image: skipped.
        _polygon_annotation(107, 2, DOG, [[50, 50, 60, 50, 60, 60]]),
        # Zero-width box: skipped.
        _polygon_annotation(109, 2, DOG, [[2, 2, 8, 2, 8, 8]], bbox=[2, 2, 0, 6]),
        {  # no segmentation (detection-only data): kept without a mask
            "id": 108,
            "image_id": 7,
            "category_id": BOTTLE,
            "bbox": [3, 4, 10, 12],
            "area": 120.0,
            "iscrowd": 0,
        },
    ]
    # Grey image 3: no annotations; image 9 only in the captions file.
    val_annotations = [
        {
            "id": 201,
            "image_id": 5,
            "category_id": DOG,
            "segmentation": compressed,
            "bbox": compressed_bbox,
            "area": 100.0,
            "iscrowd": 1,
        },
        _polygon_annotation(202, 5, PERSON, [[3, 3, 20, 3, 20, 25, 3, 25]]),
    ]
    keypoint_annotations = [
        {**train_annotations[0], "keypoints": _keypoints(1, 48, 64), "num_keypoints": 0},
        # A person only in the keypoints file: an object of its own.
        {
            **_polygon_annotation(110, 7, PERSON, [[1, 1, 20, 1, 20, 20]]),
            "keypoints": _keypoints(2, 24, 36),
            "num_keypoints": 0,
        },
    ]
    for annotation in keypoint_annotations:
        annotation["num_keypoints"] = sum(v > 0 for v in annotation["keypoints"][2::3])
    captions = [
        {"id": 301, "image_id": 1, "caption": "A person and a dog."},
        {"id": 302, "image_id": 1, "caption": " Two animals? "},
        {"id": 303, "image_id": 3, "caption": "A grey picture."},
        {"id": 304, "image_id": 9, "caption": "Only captioned."},
        {"id": 305, "image_id": 9, "caption": "   "},
    ]
    train_images = records["train"]
    files = {
        "instances_train": {
            "images": [im for im in train_images if im["id"] != 9],
            "annotations": train_annotations,
            "categories": CATEGORIES,
        },
        "person_keypoints_train": {
            "images": [im for im in train_images if im["id"] in (1, 7)],
            "annotations": keypoint_annotations,
            "categories": [PERSON_WITH_KEYPOINTS],
        },
        "captions_train": {
            "images": [im for im in train_images if im["id"] in (1, 3, 9)],
            "annotations": captions,
        },
        "instances_val": {
            "images": records["val"],
            "annotations": val_annotations,
            "categories": CATEGORIES,
        },
    }
    for file_name, content in files.items():
        with open(os.path.join(root, "annotations", f"{file_name}.json"), "w") as f:
            json.dump(content, f)
    return root


def _pycocotools(path: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> str:
    return write_coco_folder(str(tmp_path_factory.mktemp("coco") / "source"))


@pytest.fixture(scope="module")
def built(coco_dir, tmp_path_factory) -> tuple[dict, str]:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return coco.build(coco_dir, data_dir, name="tiny_coco"), data_dir


def _records(data_dir: str, split: str) -> dict[int, dict]:
    source = tfds.data_source("tiny_coco", split=split, data_dir=data_dir)
    return {int(r["image_id"]): r for r in (source[i] for i in range(len(source)))}


SKIPPED_IDS = {106, 107, 109}  # see write_coco_folder


def test_report_counts_images_annotations_skips_and_adjustments(built):
    report, data_dir = built
    train = report["splits"]["train"]
    assert (train["images"], train["annotations"], train["captions"]) == (5, 7, 4)
    assert train["skipped"] == {
        "box_outside_image": 1,
        "degenerate_box": 1,
        "degenerate_polygon": 2,
        "empty_caption": 1,
        "no_valid_polygon": 1,
    }
    assert train["adjusted"] == {"box_clipped": 1, "no_segmentation": 1, "reencoded_image": 1}
    assert train["example_ids"]["degenerate_polygon"] == [105, 106]
    assert report["splits"]["val"]["images"] == 1
    assert report["class_names"] == ["person", "dog", "bottle"]  # category-id order
    with open(os.path.join(report["dataset_dir"], coco.REPORT_FILE)) as f:
        assert json.load(f)["splits"]["train"]["skipped"] == train["skipped"]


def test_every_image_of_every_file_is_an_example_with_its_pixels(built, coco_dir):
    _, data_dir = built
    records = _records(data_dir, "train")
    assert sorted(records) == [1, 2, 3, 7, 9]
    for image_id, file_name in [(1, "a.jpg"), (2, "b.png"), (3, "grey.jpg"), (7, "rgba.png")]:
        with Image.open(os.path.join(coco_dir, "train", file_name)) as image:
            expected = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(records[image_id]["image"], expected)
    assert len(records[3]["objects"]["id"]) == 0  # no annotations
    assert len(records[9]["objects"]["id"]) == 0  # listed only in the captions file


def _expected_objects(coco_dir: str, split: str) -> tuple[COCO, dict[int, dict]]:
    """pycocotools' view of the split and its annotations as the builder should keep them."""
    instances = _pycocotools(os.path.join(coco_dir, "annotations", f"instances_{split}.json"))
    expected = {a["id"]: a for a in instances.dataset["annotations"] if a["id"] not in SKIPPED_IDS}
    if split == "train":
        kept = expected[105]["segmentation"][:1]  # its second polygon is degenerate
        expected[105] = {**expected[105], "segmentation": kept}
        keypoint_file = os.path.join(coco_dir, "annotations", "person_keypoints_train.json")
        expected[110] = _pycocotools(keypoint_file).anns[110]  # only in the keypoints file
        instances.anns[110] = expected[110]  # so that annToMask can rasterize it
    return instances, expected


@pytest.mark.parametrize("split", ["train", "val"])
def test_objects_round_trip_against_pycocotools(built, coco_dir, split):
    _, data_dir = built
    instances, expected = _expected_objects(coco_dir, split)
    seen = set()
    for image_id, record in _records(data_dir, split).items():
        height, width = record["image"].shape[:2]
        objects = record["objects"]
        polygon_sizes = np.split(record["polygon_sizes"], np.cumsum(objects["num_polygons"]))
        polygon_start = 0
        for index, annotation_id in enumerate(objects["id"]):
            annotation = expected[int(annotation_id)]
            seen.add(int(annotation_id))
            assert annotation["image_id"] == image_id
            assert objects["category_id"][index] == annotation["category_id"]
            assert objects["label"][index] == [PERSON, DOG, BOTTLE].index(annotation["category_id"])
            assert objects["is_crowd"][index] == bool(annotation["iscrowd"])
            assert objects["area"][index] == pytest.approx(annotation["area"])
            x, y, w, h = annotation["bbox"]
            clipped = [max(y, 0), max(x, 0), min(y + h, height), min(x + w, width)]
            np.testing.assert_allclose(
                objects["bbox"][index] * [height, width, height, width], clipped, atol=1e-4
            )
            rle = objects["mask_rle"][index]
            if "segmentation" in annotation:  # the same pixels as pycocotools rasterizes
                decoded = mask_utils.decode({"size": [height, width], "counts": rle})
                np.testing.assert_array_equal(decoded, instances.annToMask(annotation))
            else:
                assert rle == b""
            # Polygons: (y, x) normalized, back to back, in object order.
            segmentation = annotation.get("segmentation")
            source_polygons = segmentation if isinstance(segmentation, list) else []
            sizes = polygon_sizes[index]
            assert len(sizes) == len(source_polygons) == objects["num_polygons"][index]
            for size, polygon in zip(sizes, source_polygons, strict=True):
                points = record["polygon_points"][polygon_start : polygon_start + size]
                xy = np.asarray(polygon).reshape(-1, 2)
                np.testing.assert_allclose(points * [height, width], xy[:, ::-1], atol=1e-4)
                polygon_start += size
        assert polygon_start == len(record["polygon_points"])
    assert seen == set(expected)


def test_keypoints_are_merged_by_annotation_id_as_yx_normalized(built, coco_dir):
    _, data_dir = built
    path = os.path.join(coco_dir, "annotations", "person_keypoints_train.json")
    people = _pycocotools(path)
    records = _records(data_dir, "train")
    checked = 0
    for record in records.values():
        height, width = record["image"].shape[:2]
        for index, annotation_id in enumerate(record["objects"]["id"]):
            keypoints = record["objects"]["keypoints"][index]  # [17, 3]
            if int(annotation_id) not in people.anns:
                np.testing.assert_array_equal(keypoints, 0)
                continue
            xyv = np.asarray(people.anns[int(annotation_id)]["keypoints"]).reshape(17, 3)
            np.testing.assert_allclose(keypoints[:, 0] * height, xyv[:, 1], atol=1e-3)
            np.testing.assert_allclose(keypoints[:, 1] * width, xyv[:, 0], atol=1e-3)
            np.testing.assert_array_equal(keypoints[:, 2], xyv[:, 2])
            expected_count = people.anns[int(annotation_id)]["num_keypoints"]
            assert record["objects"]["num_keypoints"][index] == expected_count
            checked += 1
    assert checked == 2


def test_captions_match_pycocotools_by_image_id(built, coco_dir):
    _, data_dir = built
    captions = _pycocotools(os.path.join(coco_dir, "annotations", "captions_train.json"))
    records = _records(data_dir, "train")
    for image_id, record in records.items():
        expected = [a["caption"].strip() for a in captions.imgToAnns.get(image_id, [])]
        got = [c.decode() if isinstance(c, bytes) else c for c in record["captions"]]
        assert got == [c for c in expected if c]


def test_building_twice_returns_the_stored_report(built, coco_dir):
    report, data_dir = built
    again = coco.build(coco_dir, data_dir, name="tiny_coco")
    assert again["already_built"] and again["splits"] == report["splits"]


def test_second_dataset_is_built_beside_the_first_under_its_own_name(built, coco_dir):
    _, data_dir = built
    report = coco.build(coco_dir, data_dir, name="tiny_coco_val", splits=["val"])
    assert list(report["splits"]) == ["val"]
    assert len(tfds.data_source("tiny_coco_val", split="val", data_dir=data_dir)) == 1
    assert len(tfds.data_source("tiny_coco", split="train", data_dir=data_dir)) == 5


def test_sources_data_source_reads_the_dataset_as_numpy(built):
    from navit_seq.data import sources

    _, data_dir = built
    source = sources.data_source("tiny_coco", "train", data_dir)
    by_id = {int(source[i]["image_id"]): source[i] for i in range(len(source))}
    assert sorted(by_id) == [1, 2, 3, 7, 9]
    assert by_id[3]["objects"]["bbox"].shape == (0, 4)  # no objects, fixed shapes
    no_mask = list(by_id[7]["objects"]["id"]).index(108)
    assert by_id[7]["objects"]["mask_rle"][no_mask] == b""
    assert sources.class_names("tiny_coco", data_dir) == ["person", "dog", "bottle"]


def test_tokenizer_is_trained_on_training_captions_and_class_names(built):
    from navit_seq.data import sources, text

    report, data_dir = built
    assert report["sentencepiece_model"] == text.SENTENCEPIECE_FILENAME
    tokenizer = text.Tokenizer(sources.sentencepiece_model("tiny_coco", data_dir))
    for sentence in ["A person and a dog.", "bottle"]:
        assert tokenizer.decode(tokenizer.encode(sentence)) == sentence


# ---------------------------------------------------------------- bad input


def _mutated_copy(coco_dir: str, tmp_path, file_name: str, mutate) -> str:
    """A copy of the folder with one annotation file changed by `mutate(content)`."""
    copy = str(tmp_path / "copy")
    shutil.copytree(coco_dir, copy)
    path = os.path.join(copy, "annotations", file_name)
    with open(path) as f:
        content = json.load(f)
    mutate(content)
    with open(path, "w") as f:
        json.dump(content, f)
    return copy


def _set_annotation(annotation_id, **fields):
    def mutate(content):
        for annotation in content["annotations"]:
            if annotation["id"] == annotation_id:
                annotation.update(fields)

    return mutate


@pytest.mark.parametrize(
    ("file_name", "mutate", "expected"),
    [
        (
            "instances_train.json",
            _set_annotation(101, image_id=999),
            r"instances_train.json: annotation id 101 refers to image id 999",
        ),
        (
            "instances_train.json",
            _set_annotation(102, category_id=77),
            r"instances_train.json: annotation id 102 refers to category id 77",
        ),
        (
            "instances_train.json",
            _set_annotation(101, bbox=[1.0, float("nan"), 3.0, 4.0]),
            r"instances_train.json: annotation id 101 \(image id 1\) field 'bbox' contains NaN",
        ),
        (
            "person_keypoints_train.json",
            _set_annotation(110, keypoints=[float("inf")] * 51),
            r"person_keypoints_train.json: annotation id 110 .*'keypoints' contains NaN/inf",
        ),
        (
            "instances_train.json",
            _set_annotation(102, segmentation=[[1, 2, float("nan"), 4, 5, 6]]),
            r"annotation id 102 \(image id 1\) segmentation contains NaN",
        ),
        (
            "captions_train.json",
            _set_annotation(303, image_id=1234),
            r"captions_train.json: annotation id 303 refers to image id 1234",
        ),
        (
            "instances_val.json",
            _set_annotation(201, segmentation={"size": [10, 10], "counts": "abc"}),
            r"annotation id 201 \(image id 5\) has an RLE of size \[10, 10\]",
        ),
        (
            "instances_train.json",
            lambda c: c["annotations"].append(dict(c["annotations"][0])),
            r"instances_train.json: duplicate annotation id 101",
        ),
        (
            "person_keypoints_train.json",
            _set_annotation(101, image_id=7),
            r"person_keypoints_train.json: annotation id 101 has image_id 7 here but 1 in the "
            r"instances file",
        ),
        (
            "instances_train.json",
            _set_annotation(101, area="big"),
            r"instances_train.json: annotation id 101 \(image id 1\) has area='big'",
        ),
        (
            "instances_train.json",
            _set_annotation(102, bbox=[1, 2, "3", 4]),
            r"annotation id 102 \(image id 1\) field 'bbox' holds \[1, 2, '3', 4\]; expected num",
        ),
        (
            "instances_train.json",
            lambda c: c["images"][0].update(height=-4),
            r"instances_train.json: image id 1 has size -4x64",
        ),
        (
            "instances_val.json",
            _set_annotation(201, segmentation={"size": [30, 40], "counts": "abc"}),
            r"annotation id 201 \(image id 5\) has RLE runs summing to",
        ),
        (
            "instances_val.json",
            lambda c: c.update(images=[], annotations=[]),
            r"split val: .*instances_val.json list no images",
        ),
        (
            "instances_train.json",
            _set_annotation(107, segmentation=[[50, float("nan"), 60, 50, 60, 60]]),
            r"annotation id 107 \(image id 2\) segmentation contains NaN",
        ),
    ],
    ids=[
        "unknown_image",
        "unknown_category",
        "nan_box",
        "inf_keypoints",
        "nan_polygon",
        "caption_unknown_image",
        "rle_wrong_size",
        "duplicate_id",
        "keypoints_disagree_with_instance",
        "area_not_a_number",
        "box_not_numbers",
        "negative_image_size",
        "compressed_rle_wrong_length",
        "split_without_images",
        "nan_in_an_otherwise_skipped_annotation",
    ],
)
def test_bad_annotation_raises_naming_file_and_record(
    coco_dir, tmp_path, file_name, mutate, expected
):
    copy = _mutated_copy(coco_dir, tmp_path, file_name, mutate)
    with pytest.raises(coco.CocoFormatError, match=expected):
        coco.coco_format_builder(copy, str(tmp_path / "tfds"), name="bad")


def test_missing_image_file_raises_before_writing(coco_dir, tmp_path):
    copy = _mutated_copy(coco_dir, tmp_path, "instances_val.json", lambda c: None)
    os.remove(os.path.join(copy, "train", "b.png"))
    with pytest.raises(coco.CocoFormatError, match=r"1 of 5 image files are missing.*b.png"):
        coco.build(copy, str(tmp_path / "tfds"), name="bad")
    assert not os.path.exists(tmp_path / "tfds" / "bad")


def test_corrupt_image_raises_naming_file_and_image_id(coco_dir, tmp_path):
    copy = _mutated_copy(coco_dir, tmp_path, "instances_val.json", lambda c: None)
    path = os.path.join(copy, "val", "v.jpg")
    with open(path, "rb") as f:
        head = f.read(200)
    with open(path, "wb") as f:
        f.write(head)  # truncated JPEG
    with pytest.raises(coco.CocoFormatError, match=r"v.jpg \(image id 5\) is not a readable"):
        coco.build(copy, str(tmp_path / "tfds"), name="bad", splits=["val"])
    assert not os.path.exists(tmp_path / "tfds" / "bad" / coco.DATASET_VERSION)  # nothing kept


def test_image_size_disagreeing_with_json_raises(coco_dir, tmp_path):
    def mutate(content):
        content["images"][0]["height"] = 31
        content["annotations"] = content["annotations"][1:]  # keep the RLE out of it

    copy = _mutated_copy(coco_dir, tmp_path, "instances_val.json", mutate)
    with pytest.raises(coco.CocoFormatError, match=r"v.jpg \(image id 5\) is 40x30"):
        coco.build(copy, str(tmp_path / "tfds"), name="bad", splits=["val"])


def test_annotation_file_that_is_not_coco_json_raises_naming_it(coco_dir, tmp_path):
    copy = _mutated_copy(coco_dir, tmp_path, "instances_val.json", lambda c: None)
    with open(os.path.join(copy, "annotations", "captions_val.json"), "w") as f:
        f.write("[1, 2")
    with pytest.raises(coco.CocoFormatError, match=r"captions_val.json: not a readable COCO"):
        coco.coco_format_builder(copy, str(tmp_path / "tfds"), splits=["val"])


def test_compressed_rle_runs_match_the_masks_pycocotools_encoded():
    rng = np.random.default_rng(1)
    for _ in range(50):
        mask = rng.random(rng.integers(1, 30, size=2)) < rng.random()
        flat = mask.flatten(order="F").astype(np.int8)
        changes = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
        expected = [0, *runs] if flat[0] else runs  # COCO RLE starts with a run of zeros
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert coco._compressed_rle_runs(encoded["counts"].decode()) == expected


def test_split_with_captions_only_has_images_and_no_classes(coco_dir, tmp_path):
    copy = str(tmp_path / "captions_only")
    os.makedirs(os.path.join(copy, "annotations"))
    shutil.copytree(os.path.join(coco_dir, "train"), os.path.join(copy, "train"))
    shutil.copy(os.path.join(coco_dir, "annotations", "captions_train.json"), copy + "/annotations")
    builder = coco.coco_format_builder(copy, str(tmp_path / "tfds"), name="captions_only")
    assert builder.info.features["objects"]["label"].names == []
    plan = builder.plans["train"]
    assert sorted(plan.images) == [1, 3, 9] and plan.annotations == {}
    assert plan.captions[1] == ["A person and a dog.", "Two animals?"]


def test_folder_without_annotations_raises_with_the_fix(tmp_path):
    with pytest.raises(coco.CocoFormatError, match="has no 'annotations/' folder"):
        coco.build(str(tmp_path), str(tmp_path / "tfds"))


def test_unknown_split_raises_listing_available(coco_dir, tmp_path):
    with pytest.raises(coco.CocoFormatError, match=r"\['test'\].*available: \['train', 'val'\]"):
        coco.coco_format_builder(coco_dir, str(tmp_path), splits=["test"])


# ---------------------------------------------------------------- image folder layouts


def _relaid_copy(coco_dir: str, tmp_path, image_path, file_name=None) -> str:
    """A copy of the folder whose image `f` of split `s` lies at `image_path(copy, s, f)` and
    whose image records say `file_name(copy, s, f)` (default: `f`, as in the fixture)."""
    copy = str(tmp_path / "relaid")
    shutil.copytree(os.path.join(coco_dir, "annotations"), os.path.join(copy, "annotations"))
    for split in ("train", "val"):
        for name in os.listdir(os.path.join(coco_dir, split)):
            target = image_path(copy, split, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(os.path.join(coco_dir, split, name), target)
    for annotation_file in os.listdir(os.path.join(copy, "annotations")):
        split = annotation_file.rsplit("_", 1)[1].removesuffix(".json")
        path = os.path.join(copy, "annotations", annotation_file)
        with open(path) as f:
            content = json.load(f)
        for record in content["images"]:
            record["file_name"] = (file_name or (lambda c, s, f: f))(
                copy, split, record["file_name"]
            )
        with open(path, "w") as f:
            json.dump(content, f)
    return copy


LAYOUTS = {
    # <coco_dir>/images/<split>/<file>, file_name "<file>"
    "images_split": (lambda root, s, f: os.path.join(root, "images", s, f), None, "images/{s}"),
    # The user's case: images/<split>/<file> with file_name "<split>/<file>".
    "images_with_split_in_file_name": (
        lambda root, s, f: os.path.join(root, "images", s, f),
        lambda root, s, f: f"{s}/{f}",
        "images",
    ),
    # <coco_dir>/<file>: every image next to annotations/.
    "flat": (lambda root, s, f: os.path.join(root, f), None, ""),
    # Absolute file_names pointing anywhere.
    "absolute": (
        lambda root, s, f: os.path.join(root + "_elsewhere", s, f),
        lambda root, s, f: os.path.join(root + "_elsewhere", s, f),
        "{s}",  # the first folder tried: an absolute file_name is found from any of them
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_images_are_found_in_each_supported_layout(coco_dir, tmp_path, layout):
    image_path, file_name, expected_dir = LAYOUTS[layout]
    copy = _relaid_copy(coco_dir, tmp_path, image_path, file_name)
    builder = coco.coco_format_builder(copy, str(tmp_path / "tfds"), name="relaid")
    for split in ("train", "val"):
        plan = builder.plans[split]
        assert plan.image_dir == os.path.join(copy, expected_dir.format(s=split)).rstrip("/")
        for image in plan.images.values():
            found = os.path.join(plan.image_dir, image["file_name"])
            moved = image_path(copy, split, os.path.basename(image["file_name"]))
            assert os.path.samefile(found, moved)


def test_user_layout_builds_the_same_examples_as_the_split_folder_layout(built, coco_dir, tmp_path):
    _, data_dir = built
    image_path, file_name, _ = LAYOUTS["images_with_split_in_file_name"]
    copy = _relaid_copy(coco_dir, tmp_path, image_path, file_name)
    report = coco.build(copy, str(tmp_path / "tfds"), name="relaid", splits=["val"])
    assert report["splits"]["val"]["image_dir"] == os.path.join(copy, "images")
    got = tfds.data_source("relaid", split="val", data_dir=str(tmp_path / "tfds"))[0]
    np.testing.assert_array_equal(got["image"], _records(data_dir, "val")[5]["image"])


def test_image_dir_option_names_a_split_folder_anywhere(coco_dir, tmp_path):
    elsewhere = str(tmp_path / "pictures")
    copy = _relaid_copy(coco_dir, tmp_path, lambda root, s, f: os.path.join(elsewhere, s, f))
    folders = {"train": os.path.join(elsewhere, "train"), "val": os.path.join(elsewhere, "val")}
    builder = coco.coco_format_builder(copy, str(tmp_path / "tfds"), image_dirs=folders)
    assert {split: plan.image_dir for split, plan in builder.plans.items()} == folders


def test_images_in_no_folder_tried_raise_listing_the_folders_and_the_option(coco_dir, tmp_path):
    copy = _relaid_copy(coco_dir, tmp_path, lambda root, s, f: os.path.join(root, "pics", s, f))
    with pytest.raises(coco.CocoFormatError) as error:
        coco.coco_format_builder(copy, str(tmp_path / "tfds"), splits=["val"])
    message = str(error.value)
    assert "split val: 1 of 1 image files are missing" in message
    for folder in ("val", "images/val", "images", ""):
        assert f"{os.path.join(copy, folder).rstrip('/')}/ (0 found)" in message
    assert "--image-dir val=FOLDER" in message


@pytest.mark.parametrize(
    ("image_dirs", "expected"),
    [
        ({"test": "."}, r"--image-dir names splits \['test'\] that are not being built"),
        ({"val": "/no/such/folder"}, r"--image-dir val=/no/such/folder: no such folder"),
    ],
    ids=["unknown_split", "missing_folder"],
)
def test_bad_image_dir_option_raises_naming_it(coco_dir, tmp_path, image_dirs, expected):
    with pytest.raises(coco.CocoFormatError, match=expected):
        coco.coco_format_builder(coco_dir, str(tmp_path / "tfds"), image_dirs=image_dirs)
