"""Patch n' Pack: greedy first-fit packing of images into fixed-shape batches (NaViT App. A.3).

`PackIterDataset` is a grain `IterDataset` placed after the per-image work (which runs in grain
workers). For batch n it first offers the images left over from batch n - 1 (oldest first), then
reads new ones; each goes into the first of the B rows with room for its tokens and a free
example slot (at most E_max per row). An image that fits nowhere waits in a look-ahead buffer of
at most `buffer_size` images for the next batch, which starts empty and so takes it: nothing is
lost, and each example of an epoch appears exactly once. The batch is emitted when every row is
full or the buffer is full. Shapes never depend on the data (see docs/architecture.md §3).

Token dropping happens here, when an image is offered to batch n, with rate from the schedule at
step n and a generator seeded by (seed, stream index, n): exact and reproducible after a restore.

Ragged groups (`RaggedSpec`): an image may also carry arrays whose first axis varies per image,
e.g. decoder rows [R_i, T] of a sequence task or caption tokens [n_i] for contrastive
pretraining. Each group is packed per batch row under its own capacity (`max_rows_per_seq`
rows, `text_seq_len` tokens) into [B, capacity, ...] arrays plus a slot array naming the image
slot of every entry; an image fits a row only if its tokens, a slot and every group's entries
fit. An image with more entries than the capacity keeps the first ones (counted); an image
without entries of a `required` group is skipped (counted): it would carry no loss.

An example that becomes several packed images (a keypoint example: one image per person crop)
arrives as `{images: [per-image elements], counts, stream_index}`; its images are packed like
any others. Counters (`counts`) are summed when an example is read, so examples that yield no
image are counted too.

State (`get_state`, JSON): the parent's state plus the (stream index, image index) of the
buffered images, which are re-read from the random-access per-image dataset on restore, so the
next batch after `set_state` is exactly the one that would have come.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from navit_seq.data import token_drop

# Per-image counters the per-image transforms attach under `counts` (with the task's own
# counters); summed over packed images. These always appear in `stats`, even when zero.
IMAGE_COUNTS = (
    "examples_resized",
    "thin_images_stretched",
    "grayscale_to_rgb",
    "alpha_dropped",
    "scaled_16bit",
    "annotations_clipped",
)


@dataclasses.dataclass(frozen=True)
class RaggedSpec:
    """A group of per-image arrays sharing a variable first axis, packed per batch row.

    A per-image element holds the group as `element["ragged"][name] = {key: [n, *shape]}`; the
    batch holds `key: [B, capacity, *shape]` (zeros after the row's entries) and
    `slot_key: [B, capacity]` = image slot + `slot_offset` for entries, `slot_offset - 1` for
    padding (decoder rows: `row_slot`, offset 0, padding -1; text: `text_segment_ids`, offset 1,
    padding 0, like the image `segment_ids`).
    """

    name: str  # "decoder_rows", "text"
    capacity: int  # entries per batch row
    fields: dict[str, tuple[tuple[int, ...], Any]]  # batch key -> (shape after axis 0, dtype)
    slot_key: str
    slot_offset: int
    required: bool = True  # an image without entries of this group is skipped and counted

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(
                f"{self.name}: capacity {self.capacity} per sequence; set data.max_rows_per_seq "
                "(decoder rows) or data.text_seq_len (text tokens) to at least 1."
            )


def ragged_stat_keys(specs: Sequence[RaggedSpec]) -> tuple[str, ...]:
    """The counters a packer keeps per ragged group (always present, even when zero)."""
    return tuple(
        key
        for spec in specs
        for key in (
            f"{spec.name}_packed",  # entries emitted
            f"{spec.name}_truncated",  # entries cut from images with more than `capacity`
            f"images_without_{spec.name}",  # images skipped: no entry of a required group
        )
    )


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one image goes in a batch: row, slot, first token and first entry of each group."""

    element: dict  # the per-image element (architecture.md §2)
    row: int
    slot: int  # segment id - 1
    offset: int  # first token in the row
    patches: np.ndarray  # [n, P*P*C] the tokens placed (after dropping)
    patch_coords: np.ndarray  # [n, 2]
    ragged_offsets: dict[str, int]  # group name -> first entry in the row


class RowPacker:
    """First-fit placement of images into the rows of one batch: an image goes into the first
    of `batch_size` rows with room for its tokens, a free slot (at most `examples_per_row`)
    and every ragged group's entries. Training (`PackIterator`) and inference share it."""

    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        examples_per_row: int,
        ragged_specs: Sequence[RaggedSpec] = (),
    ):
        self.seq_len = seq_len
        self.examples_per_row = examples_per_row
        self.ragged_specs = tuple(ragged_specs)
        self.rows_used = np.zeros(batch_size, np.int64)  # tokens taken in each row
        self.rows_examples = np.zeros(batch_size, np.int64)  # images in each row
        self.ragged_used = {r.name: np.zeros(batch_size, np.int64) for r in self.ragged_specs}
        self.placements: list[Placement] = []

    def place(self, element: dict, patches: np.ndarray, patch_coords: np.ndarray) -> bool:
        """Places `element` with these tokens (its own, or what token dropping kept); False
        when no row has room."""
        num_tokens = patches.shape[0]
        if num_tokens > self.seq_len:
            raise ValueError(
                f"Example {element['example_id']} has {num_tokens} tokens > seq_len="
                f"{self.seq_len}; resize images to the token budget before packing."
            )
        fits = (self.rows_used + num_tokens <= self.seq_len) & (
            self.rows_examples < self.examples_per_row
        )
        for ragged in self.ragged_specs:
            fits &= self.ragged_used[ragged.name] + _num_entries(element, ragged) <= ragged.capacity
        if not fits.any():
            return False
        row = int(np.argmax(fits))  # first fit
        offsets = {name: int(used[row]) for name, used in self.ragged_used.items()}
        self.placements.append(
            Placement(
                element,
                row,
                int(self.rows_examples[row]),
                int(self.rows_used[row]),
                patches,
                patch_coords,
                offsets,
            )
        )
        self.rows_used[row] += num_tokens
        self.rows_examples[row] += 1
        for ragged in self.ragged_specs:
            self.ragged_used[ragged.name][row] += _num_entries(element, ragged)
        return True

    def full(self) -> bool:
        """Every row is out of tokens or slots."""
        return bool(
            np.all((self.rows_used >= self.seq_len) | (self.rows_examples >= self.examples_per_row))
        )


def assemble(
    placements: Sequence[Placement],
    *,
    batch_size: int,
    seq_len: int,
    max_examples_per_seq: int,
    patch_dim: int,
    target_spec: dict[str, tuple[tuple[int, ...], Any]],
    ragged_specs: Sequence[RaggedSpec] = (),
) -> dict[str, Any]:
    """The packed batch of architecture.md §3 holding `placements` (one numpy copy per image,
    no per-patch loop); shapes depend only on the arguments."""
    b, length, slots = batch_size, seq_len, max_examples_per_seq
    batch = {
        "patches": np.zeros((b, length, patch_dim), np.uint8),  # [B, L, P*P*C]
        "segment_ids": np.zeros((b, length), np.int32),  # [B, L]
        "patch_coords": np.zeros((b, length, 2), np.int32),  # [B, L, 2]
        "image_grid": np.zeros((b, slots, 2), np.int32),  # [B, E_max, 2]
        "image_size": np.zeros((b, slots, 2), np.int32),  # [B, E_max, 2]
        "original_size": np.zeros((b, slots, 2), np.int32),  # [B, E_max, 2]
        "example_valid": np.zeros((b, slots), bool),  # [B, E_max]
        "example_id": np.full((b, slots), -1, np.int64),  # [B, E_max]
        "task_id": np.zeros((b, slots), np.int32),  # [B, E_max]
        "targets": {
            name: np.zeros((b, slots, *shape), dtype)  # [B, E_max, ...]
            for name, (shape, dtype) in target_spec.items()
        },
    }
    for ragged in ragged_specs:
        for key, (shape, dtype) in ragged.fields.items():
            batch[key] = np.zeros((b, ragged.capacity, *shape), dtype)  # [B, capacity, ...]
        batch[ragged.slot_key] = np.full(  # [B, capacity]
            (b, ragged.capacity), ragged.slot_offset - 1, np.int32
        )
    for placed in placements:
        element, row, slot = placed.element, placed.row, placed.slot
        end = placed.offset + placed.patches.shape[0]
        batch["patches"][row, placed.offset : end] = placed.patches
        batch["segment_ids"][row, placed.offset : end] = slot + 1
        batch["patch_coords"][row, placed.offset : end] = placed.patch_coords
        for key in ("image_grid", "image_size", "original_size", "example_id", "task_id"):
            batch[key][row, slot] = element[key]
        batch["example_valid"][row, slot] = True
        for name, target in element["targets"].items():
            batch["targets"][name][row, slot] = target
        for ragged in ragged_specs:
            group = element["ragged"].get(ragged.name, {})
            start = placed.ragged_offsets[ragged.name]
            stop = start + _num_entries(element, ragged)
            for key in ragged.fields:
                batch[key][row, start:stop] = group[key]
            batch[ragged.slot_key][row, start:stop] = slot + ragged.slot_offset
    return batch


class PackIterDataset(grain.IterDataset):
    """Packs per-image elements (architecture.md §2) into batches (architecture.md §3)."""

    def __init__(
        self,
        parent: grain.IterDataset,
        element_at: Callable[[int], dict],
        *,
        batch_size: int,
        seq_len: int,
        max_examples_per_seq: int,
        buffer_size: int,
        patch_dim: int,
        target_spec: dict[str, tuple[tuple[int, ...], np.dtype]],
        packing: bool = True,
        token_drop_config: ml_collections.ConfigDict | None = None,
        seed: int = 0,
        ragged_specs: Sequence[RaggedSpec] = (),
    ):
        """`element_at(stream_index)` re-reads one parent element (used only on restore).

        `packing=False` puts one image per row (the ablation baseline); `token_drop_config=None`
        (evaluation) never drops tokens; `ragged_specs` lists the ragged groups to pack.
        """
        super().__init__(parent)
        if buffer_size < 1:
            raise ValueError(f"data.pack_buffer_size={buffer_size}; use at least 1.")
        if token_drop_config is not None:
            token_drop.validate_token_drop_config(token_drop_config)
        self.element_at = element_at
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.max_examples_per_seq = max_examples_per_seq
        self.buffer_size = buffer_size
        self.patch_dim = patch_dim
        self.target_spec = target_spec
        self.examples_per_row = max_examples_per_seq if packing else 1
        self.token_drop_config = token_drop_config
        self.seed = seed
        self.ragged_specs = tuple(ragged_specs)

    def __iter__(self) -> "PackIterator":
        return PackIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return (
            f"PackIterDataset(B={self.batch_size}, L={self.seq_len}, "
            f"E_max={self.max_examples_per_seq}, buffer={self.buffer_size})"
        )


class PackIterator(grain.DatasetIterator):
    """The packer's iterator; `stats` holds cumulative packing statistics (part of the state)."""

    def __init__(self, parent: grain.DatasetIterator, spec: PackIterDataset):
        super().__init__(parent)
        self._spec = spec
        self._buffer: list[dict] = []  # images read but not yet packed, oldest first
        self._batches_emitted = 0
        self._parent_exhausted = False
        self.stats = _empty_stats(spec.ragged_specs)

    def __next__(self) -> dict[str, Any]:
        spec = self._spec
        packer = RowPacker(spec.batch_size, spec.seq_len, spec.examples_per_row, spec.ragged_specs)

        def place(element: dict) -> bool:
            return packer.place(element, *self._dropped_tokens(element))

        waiting = [element for element in self._buffer if not place(element)]
        while len(waiting) < spec.buffer_size and not self._parent_exhausted and not packer.full():
            try:
                element = next(self._parent)
            except StopIteration:
                self._parent_exhausted = True
                break
            self.stats["examples_read"] += 1
            images, counts = self._images_of(element)
            for key, count in counts.items():
                self.stats[key] = self.stats.get(key, 0) + int(count)
            waiting.extend(image for image in images if not place(image))
        self._buffer = waiting
        if not packer.placements:
            raise StopIteration
        batch = assemble(
            packer.placements,
            batch_size=spec.batch_size,
            seq_len=spec.seq_len,
            max_examples_per_seq=spec.max_examples_per_seq,
            patch_dim=spec.patch_dim,
            target_spec=spec.target_spec,
            ragged_specs=spec.ragged_specs,
        )
        self._update_stats(packer.placements, packer.rows_used, packer.rows_examples)
        self._batches_emitted += 1
        return batch

    @property
    def num_buffered(self) -> int:
        """Images read from the parent that wait for a later batch."""
        return len(self._buffer)

    def _images_of(self, element: dict) -> tuple[list[dict], dict[str, int]]:
        """The packable images of a parent element (truncated ragged groups; images without
        entries of a required group left out) and the counters to add for it."""
        counts = dict(element["counts"])
        images = []
        for part, image in enumerate(element.get("images", [element])):
            image = {**image, "stream_index": element["stream_index"], "image_index": part}
            ragged = dict(image.get("ragged", {}))
            keep = True
            for spec in self._spec.ragged_specs:
                group = ragged.get(spec.name, {})
                num = _num_entries(image, spec)
                if spec.required and num == 0:
                    counts[f"images_without_{spec.name}"] = (
                        counts.get(f"images_without_{spec.name}", 0) + 1
                    )
                    keep = False
                elif num > spec.capacity:
                    counts[f"{spec.name}_truncated"] = (
                        counts.get(f"{spec.name}_truncated", 0) + num - spec.capacity
                    )
                    ragged[spec.name] = {k: v[: spec.capacity] for k, v in group.items()}
            if keep:
                images.append({**image, "ragged": ragged})
        return images, counts

    def _dropped_tokens(self, element: dict) -> tuple[np.ndarray, np.ndarray]:
        """The element's tokens after dropping at the current step (all of them at eval)."""
        config = self._spec.token_drop_config
        patches, patch_coords = element["patches"], element["patch_coords"]
        if config is None or config.kind == "none":
            return patches, patch_coords
        step = self._batches_emitted
        rng = np.random.default_rng(
            [self._spec.seed, int(element["stream_index"]), step, int(element["image_index"])]
        )
        rate = token_drop.sample_drop_rate(config, patches.shape[0], step, rng)
        return token_drop.drop_tokens(patches, patch_coords, rate, rng)

    def _update_stats(
        self, placements: list, rows_used: np.ndarray, rows_examples: np.ndarray
    ) -> None:
        stats, spec = self.stats, self._spec
        nonempty = rows_examples[rows_examples > 0]
        stats["batches"] += 1
        stats["examples_packed"] += len(placements)
        stats["tokens_real"] += int(rows_used.sum())
        stats["tokens_total"] += spec.batch_size * spec.seq_len
        stats["rows_nonempty"] += int(nonempty.size)
        if nonempty.size:
            stats["images_per_seq_min"] = min(stats["images_per_seq_min"], int(nonempty.min()))
            stats["images_per_seq_max"] = max(stats["images_per_seq_max"], int(nonempty.max()))
        for placed in placements:
            element = placed.element
            stats["tokens_dropped"] += int(element["patches"].shape[0] - placed.patches.shape[0])
            stats["tokens_before_drop"] += int(element["patches"].shape[0])
            for ragged in spec.ragged_specs:
                stats[f"{ragged.name}_packed"] += _num_entries(element, ragged)

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "buffered_stream_indices": [int(e["stream_index"]) for e in self._buffer],
            "buffered_image_indices": [int(e["image_index"]) for e in self._buffer],
            "batches_emitted": self._batches_emitted,
            "parent_exhausted": self._parent_exhausted,
            "stats": dict(self.stats),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._buffer = [
            self._images_of(self._spec.element_at(stream_index))[0][image_index]
            for stream_index, image_index in zip(
                state["buffered_stream_indices"], state["buffered_image_indices"], strict=True
            )
        ]
        self._batches_emitted = state["batches_emitted"]
        self._parent_exhausted = state["parent_exhausted"]
        self.stats = dict(state["stats"])

    def __str__(self) -> str:
        return f"PackIterator({self._spec})"


def _num_entries(element: dict, spec: RaggedSpec) -> int:
    """Entries (rows, text tokens) the image holds in a ragged group."""
    group = element.get("ragged", {}).get(spec.name)
    return len(next(iter(group.values()))) if group else 0


def _empty_stats(ragged_specs: Sequence[RaggedSpec] = ()) -> dict[str, int]:
    stats = {
        "batches": 0,
        # Examples read from the parent. Without ragged groups or crops, examples_read =
        # examples_packed + num_buffered: nothing is ever dropped.
        "examples_read": 0,
        "examples_packed": 0,  # images packed (a keypoint example gives one per person crop)
        "tokens_real": 0,  # non-padding tokens emitted
        "tokens_total": 0,  # B * L per batch
        "rows_nonempty": 0,
        "images_per_seq_min": 2**31 - 1,
        "images_per_seq_max": 0,
        "tokens_before_drop": 0,
        "tokens_dropped": 0,
    }
    stats.update(dict.fromkeys(IMAGE_COUNTS, 0))
    stats.update(dict.fromkeys(ragged_stat_keys(ragged_specs), 0))
    return stats


def summarize_stats(stats: dict[str, int]) -> dict[str, float]:
    """Derived figures: padding fraction, images per sequence, token-drop fraction."""
    rows = max(stats["rows_nonempty"], 1)
    return {
        "padding_fraction": 1.0 - stats["tokens_real"] / max(stats["tokens_total"], 1),
        "images_per_seq_mean": stats["examples_packed"] / rows,
        "images_per_seq_min": stats["images_per_seq_min"] if stats["rows_nonempty"] else 0,
        "images_per_seq_max": stats["images_per_seq_max"],
        "token_drop_fraction": stats["tokens_dropped"] / max(stats["tokens_before_drop"], 1),
    }
