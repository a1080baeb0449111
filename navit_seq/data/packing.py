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

State (`get_state`, JSON): the parent's state plus the stream indices of the buffered images,
which are re-read from the random-access per-image dataset on restore, so the next batch after
`set_state` is exactly the one that would have come.
"""

from collections.abc import Callable
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
    ):
        """`element_at(stream_index)` re-reads one parent element (used only on restore).

        `packing=False` puts one image per row (the ablation baseline); `token_drop_config=None`
        (evaluation) never drops tokens.
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
        self.stats = _empty_stats()

    def __next__(self) -> dict[str, Any]:
        spec = self._spec
        rows_used = np.zeros(spec.batch_size, np.int64)  # tokens taken in each row
        rows_examples = np.zeros(spec.batch_size, np.int64)  # images in each row
        placements = []  # (element, row, slot, offset, patches, patch_coords)

        def place(element: dict) -> bool:
            patches, patch_coords = self._dropped_tokens(element)
            num_tokens = patches.shape[0]
            if num_tokens > spec.seq_len:
                raise ValueError(
                    f"Example {element['example_id']} has {num_tokens} tokens > seq_len="
                    f"{spec.seq_len}; resize images to the token budget before packing."
                )
            fits = (rows_used + num_tokens <= spec.seq_len) & (
                rows_examples < spec.examples_per_row
            )
            if not fits.any():
                return False
            row = int(np.argmax(fits))  # first fit
            placements.append(
                (element, row, rows_examples[row], rows_used[row], patches, patch_coords)
            )
            rows_used[row] += num_tokens
            rows_examples[row] += 1
            return True

        def batch_full() -> bool:
            return bool(
                np.all((rows_used >= spec.seq_len) | (rows_examples >= spec.examples_per_row))
            )

        waiting = [element for element in self._buffer if not place(element)]
        while len(waiting) < spec.buffer_size and not self._parent_exhausted and not batch_full():
            try:
                element = next(self._parent)
            except StopIteration:
                self._parent_exhausted = True
                break
            self.stats["examples_read"] += 1
            if not place(element):
                waiting.append(element)
        self._buffer = waiting
        if not placements:
            raise StopIteration
        batch = self._assemble(placements)
        self._update_stats(placements, rows_used, rows_examples)
        self._batches_emitted += 1
        return batch

    @property
    def num_buffered(self) -> int:
        """Images read from the parent that wait for a later batch."""
        return len(self._buffer)

    def _dropped_tokens(self, element: dict) -> tuple[np.ndarray, np.ndarray]:
        """The element's tokens after dropping at the current step (all of them at eval)."""
        config = self._spec.token_drop_config
        patches, patch_coords = element["patches"], element["patch_coords"]
        if config is None or config.kind == "none":
            return patches, patch_coords
        step = self._batches_emitted
        rng = np.random.default_rng([self._spec.seed, int(element["stream_index"]), step])
        rate = token_drop.sample_drop_rate(config, patches.shape[0], step, rng)
        return token_drop.drop_tokens(patches, patch_coords, rate, rng)

    def _assemble(self, placements: list) -> dict[str, Any]:
        """Copy each placed image into its row (one numpy copy per image, no per-patch loop)."""
        spec = self._spec
        b, length, slots = spec.batch_size, spec.seq_len, spec.max_examples_per_seq
        batch = {
            "patches": np.zeros((b, length, spec.patch_dim), np.uint8),  # [B, L, P*P*C]
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
                for name, (shape, dtype) in spec.target_spec.items()
            },
        }
        for element, row, slot, offset, patches, patch_coords in placements:
            end = offset + patches.shape[0]
            batch["patches"][row, offset:end] = patches
            batch["segment_ids"][row, offset:end] = slot + 1
            batch["patch_coords"][row, offset:end] = patch_coords
            for key in ("image_grid", "image_size", "original_size", "example_id", "task_id"):
                batch[key][row, slot] = element[key]
            batch["example_valid"][row, slot] = True
            for name, target in element["targets"].items():
                batch["targets"][name][row, slot] = target
        return batch

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
        for element, *_, patches, _ in placements:
            stats["tokens_dropped"] += int(element["patches"].shape[0] - patches.shape[0])
            stats["tokens_before_drop"] += int(element["patches"].shape[0])
            for key, count in element["counts"].items():
                stats[key] = stats.get(key, 0) + int(count)

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "buffered_stream_indices": [int(e["stream_index"]) for e in self._buffer],
            "batches_emitted": self._batches_emitted,
            "parent_exhausted": self._parent_exhausted,
            "stats": dict(self.stats),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._buffer = [self._spec.element_at(i) for i in state["buffered_stream_indices"]]
        self._batches_emitted = state["batches_emitted"]
        self._parent_exhausted = state["parent_exhausted"]
        self.stats = dict(state["stats"])

    def __str__(self) -> str:
        return f"PackIterator({self._spec})"


def _empty_stats() -> dict[str, int]:
    stats = {
        "batches": 0,
        "examples_read": 0,  # = examples_packed + num_buffered: nothing is ever dropped
        "examples_packed": 0,
        "tokens_real": 0,  # non-padding tokens emitted
        "tokens_total": 0,  # B * L per batch
        "rows_nonempty": 0,
        "images_per_seq_min": 2**31 - 1,
        "images_per_seq_max": 0,
        "tokens_before_drop": 0,
        "tokens_dropped": 0,
    }
    stats.update(dict.fromkeys(IMAGE_COUNTS, 0))
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
