"""The bundled scene dataset: a TFDS builder (ArrayRecord) drawing scenes locally, no download.

Splits: `train`, `validation` (seen colour-class combinations) and `heldout` (only the
combinations train never shows, `scene_render.heldout_colour`). Example i of split s is drawn
from its own RNG seeded by (seed, s, i), so any subset can be regenerated identically and
worker processes need no coordination. After the splits are written, the builder trains a
SentencePiece model on the train captions and phrases and stores it, with a build report
(counts, including objects removed as hidden), in the dataset directory:
`<data_dir>/scenes/<version>/{sentencepiece.model, build_report.json}`.
"""

import dataclasses
import json
import multiprocessing
import multiprocessing.pool
import os
from typing import Any

import tensorflow_datasets as tfds

from navit_seq.data import scene_render, text
from navit_seq.data.builders import common
from navit_seq.data.features import example_features

REPORT_FILE = "build_report.json"
SPLITS = ("train", "validation", "heldout")
# Image ids are unique across splits: split number * IMAGE_ID_STRIDE + index.
IMAGE_ID_STRIDE = 10_000_000
# Below this many examples a split is drawn in-process: a worker pool costs more to start.
MIN_EXAMPLES_FOR_POOL = 256


class Scenes(tfds.core.GeneratorBasedBuilder):
    """Procedural scenes with boxes, masks, polygons, keypoints, captions and phrases."""

    # SceneSpec fields a variant of the dataset fixes (the subclasses below); none here.
    SPEC: dict[str, Any] = {}
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # TFDS looks for download checksums next to a builder's code, and on this install that look-up
    # needs the missing `importlib_resources` package; this builder downloads nothing.
    code_path = None

    def __init__(
        self,
        *,
        train_size: int = 10_000,
        validation_size: int = 1_000,
        heldout_size: int = 1_000,
        seed: int = 0,
        min_side: int = 48,
        max_side: int = 640,
        vocab_size: int = 512,
        num_workers: int | None = None,
        **kwargs: Any,
    ):
        """Sizes, seed and side range define the dataset; `num_workers` only the speed."""
        sizes = {"train": train_size, "validation": validation_size, "heldout": heldout_size}
        for split, size in sizes.items():
            if size < 0:
                raise ValueError(f"Scenes: {split}_size={size} must be >= 0.")
        if sizes["train"] == 0:
            raise ValueError("Scenes: train_size=0; the tokenizer is trained on train captions.")
        self.sizes = sizes
        self.seed = seed
        self.spec = scene_render.SceneSpec(  # validates
            min_side=min_side, max_side=max_side, **self.SPEC
        )
        self.vocab_size = vocab_size
        self.num_workers = num_workers or min(2, os.cpu_count() or 1)
        self._train_text: list[str] = []
        self._hidden_counts = dict.fromkeys(SPLITS, 0)
        self._object_counts = dict.fromkeys(SPLITS, 0)
        self._pool: multiprocessing.pool.Pool | None = None
        kwargs.setdefault("file_format", "array_record")  # random access for tfds.data_source
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=example_features(scene_render.label_names(self.spec), image_encoding="jpeg"),
        )

    def generation_parameters(self) -> dict[str, Any]:
        """Everything the examples depend on (the build report records it)."""
        parameters = {
            "sizes": dict(self.sizes),
            "seed": self.seed,
            "min_side": self.spec.min_side,
            "max_side": self.spec.max_side,
            "vocab_size": self.vocab_size,
            "version": str(self.VERSION),
        }
        if self.SPEC:  # a variant (the plain scenes' reports predate this key)
            parameters["scene_spec"] = {key: list(v) if isinstance(v, tuple) else v
                                        for key, v in self.SPEC.items()}  # fmt: skip
        return parameters

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        # TFDS cannot write an empty split: a size of 0 leaves the split out.
        return {split: self._generate_examples(split) for split in SPLITS if self.sizes[split]}

    def _generate_examples(self, split: str):
        combos = "heldout" if split == "heldout" else "seen"
        spec = dataclasses.replace(self.spec, combos=combos)
        first_id = SPLITS.index(split) * IMAGE_ID_STRIDE
        tasks = [
            (self.seed, split, index, spec, first_id + index) for index in range(self.sizes[split])
        ]
        if self.num_workers > 1 and len(tasks) >= MIN_EXAMPLES_FOR_POOL:
            records = self._worker_pool().imap(scene_render.render_record, tasks, chunksize=32)
        else:
            records = map(scene_render.render_record, tasks)
        yield from self._keyed(split, common.with_progress(records, split, len(tasks)))

    def _worker_pool(self) -> multiprocessing.pool.Pool:
        """One pool for all splits, closed when preparation ends."""
        if self._pool is None:
            # spawn: the parent runs TensorFlow's threads, which fork does not copy safely.
            # Workers import only scene_render (numpy, PIL, pycocotools, contourpy).
            self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
        return self._pool

    def _keyed(self, split: str, records):
        for index, example, num_hidden in records:
            self._hidden_counts[split] += num_hidden
            self._object_counts[split] += len(example["objects"]["label"])
            if split == "train":
                self._train_text += example["captions"] + example["objects"]["phrase"]
            yield index, example

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None
        # Every split is written; self.data_dir is still TFDS's temporary directory, which it
        # renames into place only after this returns, so these files land atomically too.
        text.train_sentencepiece(
            self._train_text,
            os.path.join(self.data_dir, text.SENTENCEPIECE_FILENAME),
            vocab_size=self.vocab_size,
        )
        report = {
            **self.generation_parameters(),
            "class_names": list(scene_render.label_names(self.spec)),
            "heldout_combinations": [
                f"{scene_render.COLOUR_NAMES[scene_render.heldout_colour(label)]} {name}"
                for label, name in enumerate(scene_render.label_names(self.spec))
            ],
            "objects": dict(self._object_counts),
            # Objects drawn but left out of the annotations: visible area under
            # SceneSpec.min_visible_pixels or min_visible_fraction of the object's drawn area.
            "objects_removed_as_hidden": dict(self._hidden_counts),
            "captions_per_image": self.spec.num_captions,
            "mean_objects_per_image": {
                split: self._object_counts[split] / max(1, self.sizes[split]) for split in SPLITS
            },
        }
        with open(os.path.join(self.data_dir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)


class SceneShapes(Scenes):
    """One large object per image, every class equally likely: shape classification, where fine
    detail matters (a hexagon, a circle and a pentagon blur together at a few pixels)."""

    SPEC = {
        "max_aspect_ratio": 1.5,  # the object fills the picture whatever its aspect ratio
        "min_objects": 1,
        "max_objects": 1,
        "min_object_fraction": 0.45,
        "max_object_fraction": 0.9,
        "person_probability": 1 / len(scene_render.CLASS_NAMES),
    }


class ScenesEasy(Scenes):
    """One to three large objects on plain backgrounds: every task of the scenes, learnable in
    minutes on a CPU (the quickstart's data)."""

    SPEC = {
        "min_objects": 1,
        "max_objects": 3,
        "min_object_fraction": 0.25,
        "max_object_fraction": 0.55,
        "backgrounds": ("plain",),
    }


class SceneTextures(Scenes):
    """One large shape per image on a plain background, filled with one of 12 textures and
    labelled by it (scene_render.TEXTURES, every one equally likely): texture classification,
    where resolution matters. Six fine textures (stripes at 0/45/90/135 degrees, checks,
    diamonds; period 1/32 of the longer side: 4 px at 128 px, 1 px at 32 px, where they average
    to one colour) and six coarse ones (stripes at 22.5/67.5/112.5/157.5 degrees, light and
    dark dots; period 1/8), no two alike but for their period."""

    SPEC = {
        "fill": "texture",
        "max_aspect_ratio": 1.5,
        "min_objects": 1,
        "max_objects": 1,
        "min_object_fraction": 0.6,  # mostly texture: a compact shape over most of the picture
        "max_object_fraction": 0.95,
        "backgrounds": ("plain",),  # a textured background would be another texture
    }


# Dataset name (`config.data.name`) -> builder; `python -m navit_seq.data.build scenes --variant`.
VARIANTS = {
    "scenes": Scenes,
    "scene_shapes": SceneShapes,
    "scenes_easy": ScenesEasy,
    "scene_textures": SceneTextures,
}


def read_report(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The build report stored next to the dataset's files."""
    with open(os.path.join(os.fspath(dataset_dir), REPORT_FILE)) as f:
        return json.load(f)


def heldout_combinations() -> set[tuple[int, int]]:
    """(label, colour index) pairs that appear only in the held-out split."""
    return {
        (label, scene_render.heldout_colour(label))
        for label in range(len(scene_render.CLASS_NAMES))
    }
