"""Pix2Seq sequence decoder over packed images, with a key/value cache for decoding.

Pre-LN blocks: causal self-attention over a row's tokens, cross-attention to the encoder tokens
of that row's own image, MLP. Decoder rows (docs/architecture.md §9) are `tokens [B, R, T]`
with `row_slot [B, R]`: the image slot of packed row b that decoder row r reads (segment id
row_slot + 1; -1 = padding row). Several rows may read one image, which is encoded once.
Cross-attention keys/values are computed once per packed row b ([B, L, H, Dh]) and shared by
all its decoder rows; nothing is gathered or looped per image.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from navit_seq.models import implicit as implicit_lib
from navit_seq.models.attention import ATTENTION_IMPLS, AttentionProjections, masked_attention
from navit_seq.models.navit import MLP, dtype_of
from navit_seq.models.partitioning import constrain, layer_norm, param, partitioned
from navit_seq.models.posemb import sinusoidal_frequencies

# "S" is the Pix2Seq v2 decoder (Chen et al. 2022: 6 layers, 512 wide, 8 heads, MLP 2048).
PRESETS = {
    "Ti": {"width": 128, "depth": 2, "num_heads": 4, "mlp_dim": 512},
    "S": {"width": 512, "depth": 6, "num_heads": 8, "mlp_dim": 2048},
    "B": {"width": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072},
}
_SIZE_FIELDS = ("width", "depth", "num_heads", "mlp_dim")
# What cross-attention reads (navit_seq.models.pix2seq.DecoderMemory): the encoder tokens as
# they are, or projected + LayerNormed + position-embedded + MLP (Pix2Seq's reference).
MEMORIES = ("encoder", "projected")
# How coordinate-token embeddings start: "normal" like every token (Pix2Seq), or "sinusoidal":
# bin k of num_bins as the position embedding of fraction k / (num_bins - 1) on both axes, in
# the frame of the decoder memory's position embedding (pix2seq.memory_posemb_config), scaled
# to the other tokens' init std. Neighbouring bins then start out alike, and a box coordinate
# can be read off the memory's positions by a near-identity map from the first step.
COORD_EMBEDDING_INITS = ("normal", "sinusoidal")
# How cross-attention's value and output projections start: "xavier" (independent random
# matrices, like every projection) or "copy": the value kernel a random orthogonal matrix and
# the output kernel its transpose, so at step 0 cross-attention returns the attended memory
# tokens themselves (position embedding included). With independent random matrices the
# first gradients carry no consistent "attend where the target is" signal (the value-output
# product is a random bilinear form of token and target position) and detection sits on
# the token prior for hundreds of steps; a copy makes that signal positive from the start.
CROSS_ATTENTION_INITS = ("xavier", "copy")
EMBED_INIT_STD = 0.02
# The frame of the memory's sinusoidal position embedding (pix2seq.memory_posemb_config): a
# fraction r of the image side embeds as position r * MEMORY_POSEMB_LEN.
MEMORY_POSEMB_LEN = 64

# Per layer (key, value), each [N, T_cache, H, Dh] with N = B * R flattened decoder rows.
KVCache = tuple[tuple[jax.Array, jax.Array], ...]
# Per layer (key, value) of the encoder tokens, each [B, L, H, Dh].
CrossKV = tuple[tuple[jax.Array, jax.Array], ...]


def default_decoder_config() -> ml_collections.ConfigDict:
    """`config.model.decoder` with Pix2Seq's choices; `vocab_size` must be set (Vocab.size)."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(
        {
            "variant": "S",
            **{field: placeholder(int) for field in _SIZE_FIELDS},  # override the preset
            "vocab_size": placeholder(int),  # navit_seq.tasks.vocab.Vocab(...).size
            "max_len": 512,  # positions: longest prompt + response the decoder reads
            "memory": "projected",  # MEMORIES: what cross-attention reads
            "tie_embeddings": True,  # Pix2Seq shares the input and output token embedding
            # A per-token bias on the tied logits (Pix2Seq's `output_bias`): the token prior
            # is learned by V numbers instead of being carved into the shared embedding.
            "output_bias": True,
            # "sinusoidal": coordinate tokens start as the memory's position embedding of
            # their bin (COORD_EMBEDDING_INITS); needs coord_offset and num_bins (the vocab's).
            "coord_embedding_init": "normal",
            "cross_attention_init": "xavier",  # CROSS_ATTENTION_INITS
            "coord_offset": placeholder(int),  # first coordinate token id (Vocab.coord_offset)
            "num_bins": placeholder(int),  # coordinate bins (Vocab.num_bins)
            "qk_norm": False,
            "use_bias": True,
            "dropout": 0.0,
            "attention_impl": "xla",
            "dtype": "float32",
            "param_dtype": "float32",
        }
    )


def decoder_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The preset of `config.variant` with any explicit size fields applied on top."""
    if config.variant not in PRESETS:
        raise ValueError(
            f"model.decoder.variant={config.variant!r} is not one of {tuple(PRESETS)}."
        )
    sizes = dict(PRESETS[config.variant])
    sizes.update({f: config[f] for f in _SIZE_FIELDS if config.get(f) is not None})
    return sizes


def row_image_mask(segment_ids: jax.Array, row_slot: jax.Array) -> jax.Array:
    """Boolean [B, R, L]: True where decoder row r may read encoder token l of packed row b.

    `attend[b, r, l] = segment_ids[b, l] == row_slot[b, r] + 1` for real tokens only, so a
    padding row (slot -1) reads nothing, not the padding tokens (segment 0).
    """
    same_image = segment_ids[:, None, :] == (row_slot + 1)[:, :, None]  # [B, R, L]
    return same_image & (segment_ids > 0)[:, None, :]


def coord_embeddings(num_bins: int, width: int, posemb_len: int) -> np.ndarray:
    """[num_bins, width] float32: bin k's position embedding at fraction k / (num_bins - 1)
    on both axes (phi_row + phi_col, as the memory embeds a token), centred over the bins (the
    low frequencies are nearly constant across them and would make every bin alike) and
    scaled to unit std per row: bins a few apart are similar, far ones near orthogonal."""
    # numpy, not posemb.sinusoidal: this runs inside traced parameter initialisation.
    position = np.arange(num_bins, dtype=np.float64) / max(num_bins - 1, 1) * posemb_len
    rows = 0.0
    for axis in (0, 1):
        angles = position[:, None] * sinusoidal_frequencies(width, axis)  # [num_bins, width/2]
        rows = rows + np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    rows = rows - rows.mean(axis=0, keepdims=True)  # [num_bins, width]
    return (rows / rows.std(axis=1, keepdims=True)).astype(np.float32)


def _token_embedding_init(config: ml_collections.ConfigDict, width: int):
    """The token table's initializer: N(0, 0.02), with coordinate rows per
    `config.coord_embedding_init` (COORD_EMBEDDING_INITS)."""
    normal = nnx.initializers.normal(EMBED_INIT_STD)
    kind = config.get("coord_embedding_init", "normal")
    if kind not in COORD_EMBEDDING_INITS:
        raise ValueError(
            f"model.decoder.coord_embedding_init={kind!r} is not one of {COORD_EMBEDDING_INITS}."
        )
    if kind == "normal":
        return normal
    if config.get("coord_offset") is None or not config.get("num_bins"):
        raise ValueError(
            "model.decoder.coord_embedding_init='sinusoidal' needs model.decoder.coord_offset "
            "and num_bins (the task vocabulary's; the sequence trainer fills them in)."
        )
    coords = coord_embeddings(config.num_bins, width, MEMORY_POSEMB_LEN)
    start = config.coord_offset

    def init(key, shape, dtype=jnp.float32):
        table = normal(key, shape, dtype)
        return table.at[start : start + len(coords)].set(EMBED_INIT_STD * coords.astype(dtype))

    return init


def copy_init(projections: AttentionProjections, rngs: nnx.Rngs) -> None:
    """Value kernel := a random orthogonal [D, H, Dh], output kernel := its transpose
    [H, Dh, D]: value then output is the identity (CROSS_ATTENTION_INITS)."""
    kv = projections.kv_kernel[...]  # [D, 2, H, Dh]
    width, _, heads, head_dim = kv.shape
    orthogonal = nnx.initializers.orthogonal()(rngs.params(), (width, width), kv.dtype)
    projections.kv_kernel[...] = kv.at[:, 1].set(orthogonal.reshape(width, heads, head_dim))
    projections.out_kernel[...] = orthogonal.T.reshape(heads, head_dim, width).astype(
        projections.out_kernel[...].dtype
    )


class DecoderBlock(nnx.Module):
    """Pre-LN block: x + SelfAttn(LN(x)) (causal, cached), x + CrossAttn(LN(x)), x + MLP(LN(x))."""

    def __init__(
        self,
        sizes: Mapping[str, int],
        encoder_width: int,
        config: ml_collections.ConfigDict,
        *,
        rngs: nnx.Rngs,
    ):
        dtype, param_dtype = dtype_of(config.dtype), dtype_of(config.param_dtype)
        width = sizes["width"]
        self.impl = config.attention_impl
        norm = lambda: layer_norm(
            width,
            "embed",
            use_bias=config.use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        attention = lambda source_width: AttentionProjections(
            width, source_width, sizes["num_heads"], qk_norm=config.qk_norm,
            use_bias=config.use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.self_attention_norm = norm()
        self.self_attention = attention(width)
        self.cross_attention_norm = norm()
        self.cross_attention = attention(encoder_width)
        self.mlp_norm = norm()
        self.mlp = MLP(
            width, sizes["mlp_dim"], use_bias=config.use_bias, dropout=config.dropout,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        start: jax.Array | int,
        cache: tuple[jax.Array, jax.Array] | None,
        cross_kv: tuple[jax.Array, jax.Array],
        cross_attend: jax.Array,
        *,
        deterministic: bool,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [N, S, D] at positions start..start+S-1 -> (x [N, S, D], updated cache or None).

        `cache` holds this layer's keys/values [N, T_cache, H, Dh] of earlier positions; None
        attends to the S new tokens only (teacher forcing from position `start` = 0).
        """
        num_rows, length, width = x.shape
        batch = cross_attend.shape[0]
        rows_per_batch = num_rows // batch

        hidden = self.self_attention_norm(x)
        query = self.self_attention.queries(hidden)  # [N, S, H, Dh]
        key, value = self.self_attention.keys_values(hidden)  # [N, S, H, Dh]
        query_positions = start + jnp.arange(length)  # [S]
        if cache is None:
            key_positions = query_positions
        else:
            key = jax.lax.dynamic_update_slice_in_dim(
                cache[0], key.astype(cache[0].dtype), start, 1
            )
            value = jax.lax.dynamic_update_slice_in_dim(
                cache[1], value.astype(cache[1].dtype), start, 1
            )  # [N, T_cache, H, Dh]
            cache = (key, value)
            key_positions = jnp.arange(key.shape[1])  # [T_cache]
        causal = key_positions[None, :] <= query_positions[:, None]  # [S, T_keys]
        mixed = masked_attention(query, key, value, causal[None, None], self.impl)
        x = x + self.dropout(self.self_attention.output(mixed), deterministic=deterministic)
        x = constrain(x, ("act_batch", "act_len", "act_emb"))

        # Cross-attention: rows of packed row b share its encoder keys/values [B, L, H, Dh].
        query = self.cross_attention.queries(self.cross_attention_norm(x))  # [N, S, H, Dh]
        query = query.reshape(batch, rows_per_batch * length, *query.shape[2:])  # [B, R*S, H, Dh]
        attend = jnp.broadcast_to(
            cross_attend[:, :, None, :], (batch, rows_per_batch, length, cross_attend.shape[-1])
        ).reshape(batch, 1, rows_per_batch * length, -1)  # [B, 1, R*S, L]
        mixed = masked_attention(query, *cross_kv, attend, self.impl)  # [B, R*S, H, Dh]
        mixed = self.cross_attention.output(mixed).reshape(num_rows, length, width)
        x = x + self.dropout(mixed, deterministic=deterministic)
        x = constrain(x, ("act_batch", "act_len", "act_emb"))

        hidden = self.mlp(self.mlp_norm(x), deterministic=deterministic)
        x = x + self.dropout(hidden, deterministic=deterministic)
        return constrain(x, ("act_batch", "act_len", "act_emb")), cache


class Decoder(nnx.Module):
    """Token embedding + learned positions, decoder blocks, final norm, vocabulary logits."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        encoder_width: int,
        *,
        rngs: nnx.Rngs,
        implicit: ml_collections.ConfigDict | None = None,
    ):
        if config.get("vocab_size") is None or config.vocab_size < 1:
            raise ValueError(
                f"model.decoder.vocab_size={config.get('vocab_size')!r}: set it to the task "
                "vocabulary's size, navit_seq.tasks.vocab.Vocab(...).size."
            )
        if config.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"model.decoder.attention_impl={config.attention_impl!r} is not supported; "
                f"use one of {ATTENTION_IMPLS} (the decoder's causal and cross-attention; "
                "'fused_cpu' is the encoders' segment self-attention: model.attention_impl)."
            )
        sizes = decoder_sizes(config)
        width = sizes["width"]
        dtype, param_dtype = dtype_of(config.dtype), dtype_of(config.param_dtype)
        self.dtype, self.max_len, self.vocab_size = dtype, config.max_len, config.vocab_size
        self.num_heads, self.head_dim = sizes["num_heads"], width // sizes["num_heads"]
        self.token_embed = nnx.Embed(
            config.vocab_size, width, dtype=dtype, param_dtype=param_dtype,
            embedding_init=partitioned(
                _token_embedding_init(config, width), ("vocab", "embed")
            ),
            rngs=rngs,
        )  # fmt: skip
        self.posemb = param(
            rngs, nnx.initializers.normal(0.02), ("posemb_len", "embed"),
            (config.max_len, width), param_dtype,
        )  # fmt: skip
        self.blocks = nnx.List(
            [DecoderBlock(sizes, encoder_width, config, rngs=rngs) for _ in range(sizes["depth"])]
        )
        cross_init = config.get("cross_attention_init", "xavier")
        if cross_init not in CROSS_ATTENTION_INITS:
            raise ValueError(
                f"model.decoder.cross_attention_init={cross_init!r} is not one of "
                f"{CROSS_ATTENTION_INITS}."
            )
        if cross_init == "copy":
            if encoder_width != width:
                raise ValueError(
                    f"model.decoder.cross_attention_init='copy' needs a memory as wide as the "
                    f"decoder ({encoder_width} != {width}); use model.decoder.memory='projected'."
                )
            for block in self.blocks:
                copy_init(block.cross_attention, rngs)
        # YOLOR implicit knowledge on the output (`implicit`: the checked model.implicit,
        # navit_seq.models.implicit.implicit_config; None = none).
        implicit = implicit or implicit_lib.default_implicit_config()
        self.reads_row_task = implicit_lib.reads_row_task(implicit)
        self.task_final_norm, self.refinement_per_task = implicit.task_final_norm, implicit.per_task
        if self.task_final_norm:  # what export folds a per-task refinement into
            self.final_norm = implicit_lib.TaskLayerNorm(
                implicit.num_tasks, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.final_norm = layer_norm(
                width,
                "embed",
                use_bias=config.use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        # A config.json saved before `output_bias` existed describes a model without one.
        self.output_bias = (
            param(rngs, nnx.initializers.zeros, ("vocab",), (config.vocab_size,), param_dtype)
            if config.tie_embeddings and config.get("output_bias", False)
            else None
        )
        self.output_head = (
            None
            if config.tie_embeddings
            else nnx.Linear(
                width,
                config.vocab_size,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=partitioned(nnx.initializers.xavier_uniform(), ("embed", "vocab")),
                bias_init=partitioned(nnx.initializers.zeros, ("vocab",)),
                rngs=rngs,
            )  # fmt: skip
        )
        # Last, so the explicit parameters start the same with or without it.
        self.implicit_refinement = implicit_lib.refinement(
            implicit, width, param_dtype=param_dtype, rngs=rngs
        )

    def cross_keys_values(self, encoded: jax.Array) -> CrossKV:
        """Encoder tokens [B, L, D_enc] -> every layer's cross-attention (keys, values)."""
        return tuple(block.cross_attention.keys_values(encoded) for block in self.blocks)

    def init_cache(self, num_rows: int, length: int) -> KVCache:
        """An empty self-attention cache for `num_rows` flattened rows of `length` positions."""
        shape = (num_rows, length, self.num_heads, self.head_dim)
        return tuple(
            (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.blocks
        )

    def extend(
        self,
        tokens: jax.Array,
        start: jax.Array | int,
        cross_kv: CrossKV,
        cross_attend: jax.Array,
        cache: KVCache | None = None,
        *,
        deterministic: bool = True,
        row_task: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits of `tokens` [B, R, S] at positions start..start+S-1 given the earlier
        positions in `cache` (None: there are none, start must be 0).

        `cross_attend` [B, R, L] is `row_image_mask`; rows reading no token (padding rows) get
        zero logits. `row_task` [B, R]: each row's task id (`Pix2Seq.row_tasks`), needed when
        `reads_row_task`. Returns (logits [B, R, S, V] float32, the cache with these positions).
        Positions must stay below `max_len` (checked by the callers on static shapes).
        """
        batch, rows, length = tokens.shape
        if self.reads_row_task and (row_task is None or row_task.shape != (batch, rows)):
            raise ValueError(
                f"row_task {None if row_task is None else row_task.shape} must be [B, R] = "
                f"{(batch, rows)}: this decoder is per task (model.implicit); pass "
                "Pix2Seq.row_tasks(batch)."
            )
        task = None if row_task is None else row_task.reshape(batch * rows)  # [N]
        x = self.token_embed(tokens.reshape(batch * rows, length))  # [N, S, D]
        positions = jax.lax.dynamic_slice_in_dim(self.posemb[...], start, length)  # [S, D]
        x = constrain(x + positions.astype(self.dtype), ("act_batch", "act_len", "act_emb"))
        new_cache = []
        for layer, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[layer]
            x, layer_cache = block(
                x, start, layer_cache, cross_kv[layer], cross_attend, deterministic=deterministic
            )
            new_cache.append(layer_cache)
        x = self.final_norm(x, task) if self.task_final_norm else self.final_norm(x)
        if self.implicit_refinement is not None:  # YOLOR prediction refinement
            x = self.implicit_refinement(x, task if self.refinement_per_task else None)
        if self.output_head is None:
            logits = self.token_embed.attend(x)  # tied: x @ embedding.T
            if self.output_bias is not None:
                logits = logits + self.output_bias[...].astype(logits.dtype)
        else:
            logits = self.output_head(x)
        logits = logits.astype(jnp.float32).reshape(batch, rows, length, self.vocab_size)
        row_reads_image = cross_attend.any(-1)[:, :, None, None]  # [B, R, 1, 1]
        logits = constrain(
            jnp.where(row_reads_image, logits, 0), ("act_batch", None, "act_len", None)
        )
        return logits, (None if cache is None else tuple(new_cache))

    def __call__(
        self,
        tokens: jax.Array,
        encoded: jax.Array,
        segment_ids: jax.Array,
        row_slot: jax.Array,
        *,
        deterministic: bool,
        row_task: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher forcing: tokens [B, R, T], encoder tokens [B, L, D_enc], segment_ids [B, L],
        row_slot [B, R] (and row_task [B, R], see `extend`) -> logits [B, R, T, V] (float32;
        zero for padding rows)."""
        if tokens.ndim != 3 or row_slot.shape != tokens.shape[:2]:
            raise ValueError(
                f"decoder tokens {tokens.shape} and row_slot {row_slot.shape} must be [B, R, T] "
                "and [B, R] (docs/architecture.md §9)."
            )
        if tokens.shape[-1] > self.max_len:
            raise ValueError(
                f"decoder rows of {tokens.shape[-1]} tokens exceed model.decoder.max_len="
                f"{self.max_len}; raise max_len or shorten data.task seq_len."
            )
        cross_attend = row_image_mask(segment_ids, row_slot)  # [B, R, L]
        cross_kv = self.cross_keys_values(encoded)
        logits, _ = self.extend(
            tokens, 0, cross_kv, cross_attend, deterministic=deterministic, row_task=row_task
        )
        return logits
