"""The token-label loss (navit_seq.data.token_labels): softmax cross-entropy of each encoder
token's class logits `token_logits [B, L, 1 + C]` (0 = background) against the label of the
patch it shows, read from the per-slot label grids at the token's slot and patch coordinates.

Sums, like the decoder loss (losses/sequence.py): the sequence objective adds
`weight * sum(ce)` to the decoder's `sum(w * ce)` before the one division by the decoder's
total weight, so `weight` is what one labelled token counts relative to one decoder token of
weight 1, and gradient accumulation stays exact. Unlabelled tokens (padding, IGNORE) count 0.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from navit_seq.data.token_labels import IGNORE, TARGET_KEY


def labels_of_tokens(batch: Mapping[str, Any]) -> jax.Array:
    """`targets[TARGET_KEY]` [B, E_max, G, G] at each token's slot and (row, col) -> int32
    [B, L]: 1 + class, 0 background, IGNORE (padding tokens too)."""
    grids = jnp.asarray(batch["targets"][TARGET_KEY])  # [B, E, G, G]
    segment_ids = jnp.asarray(batch["segment_ids"])  # [B, L]
    coords = jnp.asarray(batch["patch_coords"])  # [B, L, 2] (row, col)
    b, e, g, _ = grids.shape
    slot = jnp.clip(segment_ids - 1, 0, e - 1)
    row = jnp.clip(coords[..., 0], 0, g - 1)
    col = jnp.clip(coords[..., 1], 0, g - 1)
    index = (slot * g + row) * g + col  # [B, L] into the flattened grids
    labels = jnp.take_along_axis(grids.reshape(b, e * g * g), index, axis=1)
    return jnp.where(segment_ids > 0, labels, IGNORE)


def token_label_sums(
    token_logits: jax.Array, batch: Mapping[str, Any]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of ce, number of labelled tokens, number predicted right) over the batch."""
    labels = labels_of_tokens(batch)  # [B, L]
    labelled = labels != IGNORE
    safe = jnp.where(labelled, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(token_logits.astype(jnp.float32), safe)
    right = (jnp.argmax(token_logits, axis=-1) == labels) & labelled
    count = labelled.sum().astype(jnp.float32)
    return jnp.where(labelled, ce, 0.0).sum(), count, right.sum().astype(jnp.float32)
