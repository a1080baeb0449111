"""The grain input pipeline: decoded examples -> per-image tokens (in workers) -> packed batches.

    source[process_index::process_count] -> shuffle -> repeat -> task encoding, resolution,
    patchify (grain RandomMap, in `num_workers` worker processes) -> PackIterDataset (main
    process: token dropping + packing) -> batches of architecture.md §3

Per host: each process reads the records `process_index::process_count` of the source and packs
its own `batch_size / process_count` rows; the trainer assembles them into global arrays. This
module never imports JAX (grain workers import it), so the caller passes the process index.
"""

from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from navit_seq import tasks
from navit_seq.data import packing, patches, resolution, token_drop


def default_data_config() -> ml_collections.ConfigDict:
    """Data fields of architecture.md §6 with NaViT's pretraining defaults; recipes extend it."""
    return ml_collections.ConfigDict(
        {
            "name": "scenes",
            "data_dir": "datasets",
            "train_split": "train",
            "eval_split": "validation",
            "seed": 0,
            "shuffle": True,
            "num_epochs": None,  # training repeats forever; evaluation reads one epoch
            "patch_size": 16,
            "seq_len": 256,  # L: NaViT-B/16 pretraining packs 256 tokens (Table 2)
            "batch_size": 32,  # B: global rows; each host packs batch_size / process_count
            "max_examples_per_seq": 8,  # E_max: pooled slots per row
            "packing": True,  # False: one image per row, padded (the ablation baseline)
            "pack_buffer_size": 64,  # look-ahead images that wait for a later batch
            "num_workers": 1,  # grain worker processes for the per-image work
            "worker_threads": 1,  # reader threads per worker (the machine has 2 cores)
            "worker_buffer_size": 64,  # per-image elements each worker prefetches
            "resolution": resolution.default_resolution_config(),
            "eval_max_tokens": 256,  # evaluation: largest size with at most this many tokens
            # Longest image side in patches (0: no limit); keep <= model.posemb.max_len so a
            # learned position table is never indexed out of range.
            "max_grid_side": 64,
            "token_drop": token_drop.default_token_drop_config(),
            "task": {"name": "classification", "num_classes": 0},  # 0: read from the source
        }
    )


def get_config() -> ml_collections.ConfigDict:
    """Lets a command line name this module as its config: `--config navit_seq/data/pipeline.py`."""
    return default_data_config()


def validate_data_config(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
    """Raise a ValueError naming the field and the fix for an inconsistent configuration."""
    resolution.validate_resolution_config(config.resolution)
    token_drop.validate_token_drop_config(config.token_drop)
    if config.batch_size % process_count:
        raise ValueError(
            f"data.batch_size={config.batch_size} is not divisible by the {process_count} "
            "processes; each host packs batch_size / process_count rows."
        )
    if config.max_examples_per_seq < 1 or config.seq_len < 1:
        raise ValueError(
            f"data.max_examples_per_seq={config.max_examples_per_seq}, data.seq_len="
            f"{config.seq_len}; both must be at least 1."
        )
    if config.max_grid_side < 0:
        raise ValueError(
            f"data.max_grid_side={config.max_grid_side}; use 0 (no limit) or the model's "
            "model.posemb.max_len."
        )
    if not 0 < config.eval_max_tokens <= config.seq_len:
        raise ValueError(
            f"data.eval_max_tokens={config.eval_max_tokens}; use 1..seq_len={config.seq_len}."
        )


class AddIndex(grain.transforms.MapWithIndex):
    """Store the element's index in the dataset under `key` (picklable for grain workers)."""

    def __init__(self, key: str):
        self.key = key

    def map_with_index(self, index: int, element: dict) -> dict:
        return {**element, self.key: index}


class PrepareImage(grain.transforms.RandomMap):
    """Decoded example -> per-image element of architecture.md §2 (task targets, resized tokens)."""

    def __init__(
        self,
        task: tasks.Task,
        resolution_config: ml_collections.ConfigDict,
        patch_size: int,
        max_tokens: int,
        max_grid_side: int,
        training: bool,
    ):
        self.task = task
        self.training = training
        self.resolution_config = resolution_config
        self.patch_size = patch_size
        self.max_tokens = max_tokens
        self.max_grid_side = max_grid_side

    def random_map(self, element: dict, rng: np.random.Generator) -> dict[str, Any]:
        example_id = int(element["example_id"])
        image, counts = patches.standardize_pixels(element["image"], example_id)
        element, counts["annotations_clipped"] = resolution.clip_annotations(element)
        targets, task_counts = self.task.encode(element, training=self.training, rng=rng)
        counts.update(task_counts)
        height, width = image.shape[:2]
        rows, cols, size_counts = resolution.sample_grid(
            self.resolution_config,
            height,
            width,
            self.patch_size,
            self.max_tokens,
            rng,
            max_grid_side=self.max_grid_side,
        )
        counts.update(size_counts)
        image = resolution.resize_image(image, rows * self.patch_size, cols * self.patch_size)
        image_patches, patch_coords, image_grid = patches.patchify(image, self.patch_size)
        return {
            "patches": image_patches,  # [N, P*P*3] uint8
            "patch_coords": patch_coords,  # [N, 2] int32
            "image_grid": image_grid,  # [2] int32
            "image_size": np.array(image.shape[:2], np.int32),
            "original_size": np.array([height, width], np.int32),
            "example_id": np.int64(example_id),
            "task_id": np.int32(self.task.task_id),
            "targets": targets,
            "stream_index": int(element["stream_index"]),
            "counts": counts,
        }


def host_seed(seed: int, process_index: int) -> int:
    """Seed of one host's shuffle, resolution draws and token drops: independent across hosts."""
    return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def per_image_dataset(
    source: Sequence[dict],
    config: ml_collections.ConfigDict,
    *,
    train: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Random-access dataset of per-image elements for this host (also used to restore state)."""
    task = tasks.get_task(config.task)
    ds = grain.MapDataset.source(source)
    ds = ds.map_with_index(AddIndex("example_id"))  # the record's index in the whole source
    ds = ds[process_index::process_count].seed(host_seed(config.seed, process_index))
    if train and config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(config.num_epochs if train else 1)
    ds = ds.map_with_index(AddIndex("stream_index"))  # position in this host's stream
    if train:
        resolution_config, max_tokens = config.resolution, config.seq_len
    else:  # evaluation: the largest size that fits the token budget, deterministic
        resolution_config = ml_collections.ConfigDict({**config.resolution, "kind": "token_budget"})
        max_tokens = config.eval_max_tokens
    return ds.random_map(
        PrepareImage(
            task,
            resolution_config,
            config.patch_size,
            max_tokens,
            config.max_grid_side,
            training=train,
        )
    )


def make_dataset(
    source: Sequence[dict],
    config: ml_collections.ConfigDict,
    *,
    train: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> packing.PackIterDataset:
    """The packed-batch grain dataset of `config` (architecture.md §6) over a decoded source.

    Training shuffles, repeats `num_epochs` times (None: forever) and drops tokens; evaluation
    reads one epoch in order at the token budget and never drops.
    """
    validate_data_config(config, process_count)
    images = per_image_dataset(
        source, config, train=train, process_index=process_index, process_count=process_count
    )
    stream = images.to_iter_dataset(
        grain.ReadOptions(num_threads=config.worker_threads, prefetch_buffer_size=16)
    )
    if config.num_workers > 0:
        # grain 0.2.18's mp_prefetch reads an absl flag and fails when the program (a library
        # user, pytest) never parsed flags; their defaults are what we want then.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers,
                per_worker_buffer_size=config.worker_buffer_size,
            )
        )
    task = tasks.get_task(config.task)
    patch_dim = config.patch_size * config.patch_size * patches.NUM_CHANNELS
    return packing.PackIterDataset(
        stream,
        images.__getitem__,
        batch_size=config.batch_size // process_count,
        seq_len=config.seq_len,
        max_examples_per_seq=config.max_examples_per_seq,
        buffer_size=config.pack_buffer_size,
        patch_dim=patch_dim,
        target_spec=task.target_spec(),
        packing=config.packing,
        token_drop_config=config.token_drop if train else None,
        seed=host_seed(config.seed, process_index),
    )
