"""Positional embeddings for packed patches: factorized variants and the two baselines.

Every variant the NaViT paper ablates:
- `factorized`: phi_y(row) and phi_x(col), combined by `sum`, `stack` (concatenate halves)
  or `product`; each phi is `learned` (a table), `sinusoidal` or `fourier` (learned
  frequencies, sin and cos); coordinates `absolute` (patch index) or `fractional`
  (index / side length, in [0, 1)).
- `learned_1d`: ViT's table over the flattened index row * cols + col.
- `learned_2d`: Pix2struct's table [max_len, max_len] over (row, col).

Learned tables have `max_len` rows per axis. Fractional learned coordinates use `max_len`
bins of [0, 1) and never leave the table. Absolute indices past the table (an image larger
than any the table covers) raise a clear error (`out_of_range="error"`, checked on concrete
inputs and, under jit, by a host callback) or, with `out_of_range="clamp"`, reuse the last
row (documented edge extrapolation). The table is never indexed out of range.
Sinusoidal and Fourier embeddings take fractional coordinates as r * max_len, so both
coordinate kinds span the same frequency range.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from navit_seq.models.index_check import check_index_below
from navit_seq.models.partitioning import param

KINDS = ("factorized", "learned_1d", "learned_2d")
EMBEDDINGS = ("learned", "sinusoidal", "fourier")
COORDS = ("absolute", "fractional")
COMBINES = ("sum", "stack", "product")
OUT_OF_RANGE = ("error", "clamp")
_TABLE_INIT = nnx.initializers.normal(stddev=0.02)


def default_posemb_config() -> ml_collections.ConfigDict:
    """The paper's best variant: factorized learned embeddings, summed."""
    return ml_collections.ConfigDict(
        {
            "kind": "factorized",
            "embedding": "learned",
            "coords": "absolute",
            "combine": "sum",
            "max_len": 64,  # patches per side a learned table covers (1024 px at patch 16)
            "out_of_range": "error",
        }
    )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"model.posemb.{name}={value!r} is not one of {choices}.")


def _out_of_range_message(largest: int, table_len: int, what: str) -> str:
    return (
        f"patch_coords give a {what} position of {largest}, but the learned position table "
        f"has only {table_len} entries (model.posemb.max_len). Raise model.posemb.max_len, "
        "cap the image resolution in the data config, use fractional coordinates or a "
        "sinusoidal/fourier embedding, or set model.posemb.out_of_range='clamp' to reuse "
        "the last entry."
    )


def sinusoidal_frequencies(dim: int, axis: int) -> np.ndarray:
    """The dim/2 transformer frequencies 1 / 10000^(i / (dim/2)) for the row axis (0).

    The column axis (1) takes the frequencies half-way between them, so that phi_y and phi_x
    differ: with equal frequencies, sum and product would embed (r, c) and (c, r) alike.
    """
    half = dim // 2
    return 1.0 / 10_000 ** ((np.arange(half, dtype=np.float32) + 0.5 * axis) / half)


def sinusoidal(positions: jax.Array, dim: int, axis: int) -> jax.Array:
    """Sin/cos embedding of float positions [...] along `axis` (0 row, 1 column) -> [..., dim]."""
    angles = positions[..., None].astype(jnp.float32) * sinusoidal_frequencies(dim, axis)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., dim]


class PositionalEmbedding(nnx.Module):
    """Maps each token's (row, col) in its image to a [D] embedding (see module docstring)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        width: int,
        *,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_choice("kind", config.kind, KINDS)
        _check_choice("embedding", config.embedding, EMBEDDINGS)
        _check_choice("coords", config.coords, COORDS)
        _check_choice("combine", config.combine, COMBINES)
        _check_choice("out_of_range", config.out_of_range, OUT_OF_RANGE)
        self.kind, self.embedding = config.kind, config.embedding
        self.coords, self.combine = config.coords, config.combine
        self.max_len, self.out_of_range = config.max_len, config.out_of_range
        self.width = width
        self.axis_dim = width // 2 if config.combine == "stack" else width
        needs_pairs = config.kind == "factorized" and config.embedding != "learned"
        if needs_pairs and self.axis_dim % 2:
            raise ValueError(
                f"{config.embedding} embedding needs an even per-axis width, got "
                f"{self.axis_dim} (model width {width}, combine={config.combine!r})."
            )
        table = lambda names, shape: param(rngs, _TABLE_INIT, names, shape, param_dtype)
        kind, embedding, max_len = config.kind, config.embedding, config.max_len
        factorized_learned = kind == "factorized" and embedding == "learned"
        if kind == "learned_1d":
            self.table = table(("posemb_len", "embed"), (max_len * max_len, width))
        elif kind == "learned_2d":
            self.table = table(("posemb_len", None, "embed"), (max_len, max_len, width))
        else:
            self.table = None
        axis_table = lambda: table(("posemb_len", "embed"), (max_len, self.axis_dim))
        self.row_table = axis_table() if factorized_learned else None
        self.col_table = axis_table() if factorized_learned else None
        # Fourier frequencies start at the sinusoidal ones (one row per axis); training moves
        # them.
        half = self.axis_dim // 2
        start = np.stack([sinusoidal_frequencies(self.axis_dim, axis) for axis in (0, 1)])
        init = lambda key, shape, dtype: jnp.asarray(start, dtype)
        fourier = kind == "factorized" and embedding == "fourier"
        self.frequencies = (
            param(rngs, init, (None, None), (2, half), param_dtype) if fourier else None
        )

    def __call__(
        self, patch_coords: jax.Array, segment_ids: jax.Array, image_grid: jax.Array
    ) -> jax.Array:
        """patch_coords [B, L, 2], segment_ids [B, L], image_grid [B, E, 2] -> [B, L, D]."""
        rows, cols = patch_coords[..., 0], patch_coords[..., 1]  # [B, L]
        if self.kind == "learned_2d":
            rows = self._table_index(rows, self.max_len, "row")
            cols = self._table_index(cols, self.max_len, "column")
            return self.table[...][rows, cols]  # [B, L, D]
        grid = _token_grid(segment_ids, image_grid)  # [B, L, 2]
        if self.kind == "learned_1d":
            flat = rows * grid[..., 1] + cols  # [B, L]
            flat = self._table_index(flat, self.max_len * self.max_len, "flattened")
            return jnp.take(self.table[...], flat, axis=0)  # [B, L, D]
        phi_y = self._embed_axis(rows, grid[..., 0], 0)  # [B, L, D or D/2]
        phi_x = self._embed_axis(cols, grid[..., 1], 1)
        if self.combine == "sum":
            return phi_y + phi_x
        if self.combine == "product":
            return phi_y * phi_x
        return jnp.concatenate([phi_y, phi_x], axis=-1)

    def _embed_axis(self, index: jax.Array, side: jax.Array, axis: int) -> jax.Array:
        """One factor phi of the factorized embedding: index [B, L] -> [B, L, axis_dim]."""
        if self.embedding == "learned":
            table = (self.row_table, self.col_table)[axis][...]
            if self.coords == "fractional":
                # floor(index / side * max_len) < max_len because index < side.
                index = (index * self.max_len) // side
                index = jnp.clip(index, 0, self.max_len - 1)
            else:
                index = self._table_index(index, self.max_len, ("row", "column")[axis])
            return jnp.take(table, index, axis=0)
        position = index.astype(jnp.float32)
        if self.coords == "fractional":
            position = position / side * self.max_len
        if self.embedding == "sinusoidal":
            return sinusoidal(position, self.axis_dim, axis)
        angles = position[..., None] * self.frequencies[...][axis].astype(jnp.float32)
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

    def _table_index(self, index: jax.Array, table_len: int, what: str) -> jax.Array:
        """Checks (policy "error") and clips `index` into a table of `table_len` entries."""
        if self.out_of_range == "error":
            check_index_below(
                index, table_len, lambda largest: _out_of_range_message(largest, table_len, what)
            )
        return jnp.clip(index, 0, table_len - 1)


def _token_grid(segment_ids: jax.Array, image_grid: jax.Array) -> jax.Array:
    """Each token's image (rows, cols) [B, L, 2], at least 1 (padding reads a harmless 1)."""
    slot = jnp.maximum(segment_ids - 1, 0)[..., None]  # [B, L, 1]
    grid = jnp.take_along_axis(image_grid, slot, axis=1)  # [B, L, 2]
    return jnp.maximum(grid, 1)
