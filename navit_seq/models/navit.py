"""NaViT encoder over packed batches: patch embedding, positional embedding, pre-LN blocks
with segment-masked attention, final norm, masked pooling to one vector per example slot.

Input: the packed batch of docs/architecture.md section 3. Output: `tokens` [B, L, D] (zero at
padding), `pooled` [B, E_max, D] (zero at empty slots) and `pooled_valid` [B, E_max].
Token dropping lives in the input pipeline, never here; dropout runs only when
`deterministic=False`.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from navit_seq.data.patches import unit_range
from navit_seq.models.attention import SelfAttention
from navit_seq.models.partitioning import constrain, layer_norm, partitioned
from navit_seq.models.pooling import POOLINGS, MAPHead, masked_mean_pool, slot_token_mask
from navit_seq.models.posemb import PositionalEmbedding, default_posemb_config

# Standard ViT sizes (Dosovitskiy et al. 2021; g from Zhai et al. 2022, "Scaling ViTs").
PRESETS = {
    "Ti": {"width": 192, "depth": 12, "num_heads": 3, "mlp_dim": 768},
    "S": {"width": 384, "depth": 12, "num_heads": 6, "mlp_dim": 1536},
    "B": {"width": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072},
    "L": {"width": 1024, "depth": 24, "num_heads": 16, "mlp_dim": 4096},
    "H": {"width": 1280, "depth": 32, "num_heads": 16, "mlp_dim": 5120},
    "g": {"width": 1408, "depth": 40, "num_heads": 16, "mlp_dim": 6144},
}
_SIZE_FIELDS = ("width", "depth", "num_heads", "mlp_dim")
# How a patch becomes a token: "linear" (ViT: one dense layer on the flattened pixels) or
# "conv": a small convolutional stem inside each patch (3x3 stride-2 convolutions + GELU down
# to 2x2, then a dense layer), after Xiao et al. 2021 ("Early convolutions help transformers
# see better"). It never looks across patches, so packing, token dropping and the
# per-image equivalence are untouched.
PATCH_EMBEDDINGS = ("linear", "conv")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def preset(variant: str) -> dict[str, int]:
    """Width, depth, heads and MLP size of a named ViT size ("Ti", "S", "B", "L", "H", "g")."""
    if variant not in PRESETS:
        raise ValueError(f"model.variant={variant!r} is not one of {tuple(PRESETS)}.")
    return dict(PRESETS[variant])


def default_model_config() -> ml_collections.ConfigDict:
    """`config.model` for the encoder with the paper's choices; recipes extend it."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(
        {
            "variant": "S",
            # Set any of these to override the preset (tests use tiny models).
            **{field: placeholder(int) for field in _SIZE_FIELDS},
            "patch_size": 16,
            "num_channels": 3,
            "patch_embedding": "linear",  # PATCH_EMBEDDINGS
            "posemb": default_posemb_config(),
            "qk_norm": True,  # NaViT: query-key normalization
            "use_bias": False,  # NaViT: no biases in dense layers and norms
            "pooling": "map",  # "map" (attention pooling), "mean", or "none" (pooled = 0)
            "attention_impl": "xla",  # or "fused_cpu" (models/attention.py)
            "dropout": 0.0,
            "num_classes": 1000,  # used by the Classifier only
            "head_bias_init": 0.0,
            "dtype": "float32",  # activation dtype
            "param_dtype": "float32",
        }
    )


def model_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The preset of `config.variant` with any explicit size fields applied on top."""
    sizes = preset(config.variant)
    sizes.update({f: config[f] for f in _SIZE_FIELDS if config.get(f) is not None})
    return sizes


def dtype_of(name: str) -> jnp.dtype:
    """A dtype from its config name, with a clear error."""
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {tuple(_DTYPES)}.")
    return _DTYPES[name]


class MLP(nnx.Module):
    """Dense -> GELU -> dropout (only when not deterministic) -> dense."""

    def __init__(
        self,
        width: int,
        mlp_dim: int,
        *,
        use_bias: bool,
        dropout: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        dense = lambda d_in, d_out, names: nnx.Linear(
            d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            kernel_init=partitioned(nnx.initializers.xavier_uniform(), names),
            bias_init=partitioned(nnx.initializers.normal(1e-6), names[1:]),
            rngs=rngs,
        )  # fmt: skip
        self.fc1 = dense(width, mlp_dim, ("embed", "mlp"))
        self.fc2 = dense(mlp_dim, width, ("mlp", "embed"))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """x [B, L or E, D] -> [B, L or E, D]."""
        hidden = jax.nn.gelu(self.fc1(x))  # [B, L or E, mlp_dim]
        hidden = constrain(hidden, ("act_batch", "act_len", "act_mlp")[-hidden.ndim :])
        hidden = self.dropout(hidden, deterministic=deterministic)
        return self.fc2(hidden)


class ConvPatchStem(nnx.Module):
    """Patch pixels [..., P*P*C] -> [..., D]: stride-2 3x3 convolutions + GELU inside each
    patch until it is 2x2 (channels D/2^k up to D), then a dense layer on the 2x2xD map."""

    def __init__(self, patch_size: int, num_channels: int, width: int, *, dtype, param_dtype,
                 rngs: nnx.Rngs):  # fmt: skip
        num_convs = int(np.log2(patch_size)) - 1
        if patch_size != 2 ** (num_convs + 1) or num_convs < 1:
            raise ValueError(
                f"model.patch_embedding='conv' needs a power-of-two patch_size >= 4, got "
                f"{patch_size}; use patch_embedding='linear'."
            )
        self.patch_size, self.num_channels = patch_size, num_channels
        channels = [num_channels] + [max(width >> (num_convs - i), 8) for i in range(num_convs)]
        self.convs = nnx.List([
            nnx.Conv(
                channels[i], channels[i + 1], (3, 3), strides=2, padding="SAME", dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=partitioned(nnx.initializers.he_normal(), (None, None, None, None)),
                bias_init=partitioned(nnx.initializers.zeros, (None,)),
                rngs=rngs,
            )
            for i in range(num_convs)
        ])  # fmt: skip
        self.output = nnx.Linear(
            4 * channels[-1], width, dtype=dtype, param_dtype=param_dtype,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), (None, "embed")),
            bias_init=partitioned(nnx.initializers.zeros, ("embed",)),
            rngs=rngs,
        )  # fmt: skip

    def __call__(self, pixels: jax.Array) -> jax.Array:
        leading = pixels.shape[:-1]
        x = pixels.reshape(-1, self.patch_size, self.patch_size, self.num_channels)  # [N, P, P, C]
        for conv in self.convs:
            x = jax.nn.gelu(conv(x))  # [N, P/2^k, P/2^k, C_k]
        return self.output(x.reshape(*leading, -1))  # [..., D]


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, sizes: Mapping[str, int], config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
    ):
        dtype, param_dtype = dtype_of(config.dtype), dtype_of(config.param_dtype)
        width = sizes["width"]
        norm = lambda: layer_norm(
            width,
            "embed",
            use_bias=config.use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.attention_norm = norm()
        self.attention = SelfAttention(
            width, sizes["num_heads"], qk_norm=config.qk_norm, use_bias=config.use_bias,
            impl=config.attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.mlp_norm = norm()
        self.mlp = MLP(
            width, sizes["mlp_dim"], use_bias=config.use_bias, dropout=config.dropout,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None, *, deterministic: bool
    ) -> jax.Array:
        """x [B, L, D], segment_ids [B, L] (0 = padding; None: no mask) -> [B, L, D]."""
        mixed = self.attention(self.attention_norm(x), segment_ids)
        x = x + self.dropout(mixed, deterministic=deterministic)
        x = constrain(x, ("act_batch", "act_len", "act_emb"))
        hidden = self.mlp(self.mlp_norm(x), deterministic=deterministic)
        x = x + self.dropout(hidden, deterministic=deterministic)
        return constrain(x, ("act_batch", "act_len", "act_emb"))


def encoder_stack(
    sizes: Mapping[str, int], config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
) -> tuple[nnx.List, nnx.LayerNorm, MAPHead | None]:
    """The transformer stack shared by the image (NaViT) and text towers: `depth` blocks, the
    final norm, and the MAP head when `config.pooling == "map"` (else None)."""
    dtype, param_dtype = dtype_of(config.dtype), dtype_of(config.param_dtype)
    width = sizes["width"]
    blocks = nnx.List([EncoderBlock(sizes, config, rngs=rngs) for _ in range(sizes["depth"])])
    final_norm = layer_norm(
        width, "embed", use_bias=config.use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    map_head = None
    if config.pooling == "map":
        mlp = MLP(width, sizes["mlp_dim"], use_bias=config.use_bias, dropout=0.0,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # fmt: skip
        map_head = MAPHead(
            width, sizes["num_heads"], mlp, use_bias=config.use_bias, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
    return blocks, final_norm, map_head


def pool_examples(
    tokens: jax.Array, segment_ids: jax.Array, example_valid: jax.Array, map_head, pooling: str
) -> dict[str, jax.Array]:
    """tokens [B, L, D] -> {"tokens", "pooled" [B, E, D] (zero at empty slots), "pooled_valid"
    [B, E]}: one vector per example slot, by the MAP head, a masked mean, or zeros ("none")."""
    in_slot = slot_token_mask(segment_ids, example_valid.shape[1])  # [B, E, L]
    pooled_valid = example_valid & in_slot.any(-1)  # [B, E]
    if pooling == "map":
        pooled = map_head(tokens, in_slot)
    elif pooling == "mean":
        pooled = masked_mean_pool(tokens, in_slot)
    else:
        pooled = jnp.zeros((*pooled_valid.shape, tokens.shape[-1]), tokens.dtype)
    pooled = jnp.where(pooled_valid[..., None], pooled, 0)  # [B, E, D]
    return {"tokens": tokens, "pooled": pooled, "pooled_valid": pooled_valid}


class NaViT(nnx.Module):
    """The NaViT encoder (see the module docstring for inputs and outputs)."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if config.pooling not in (*POOLINGS, "none"):
            raise ValueError(
                f"model.pooling={config.pooling!r} is not one of {(*POOLINGS, 'none')}."
            )
        sizes = model_sizes(config)
        width = sizes["width"]
        dtype, param_dtype = dtype_of(config.dtype), dtype_of(config.param_dtype)
        self.dtype, self.pooling = dtype, config.pooling
        self.patch_dim = config.patch_size**2 * config.num_channels
        kind = config.get("patch_embedding", "linear")
        if kind not in PATCH_EMBEDDINGS:
            raise ValueError(f"model.patch_embedding={kind!r} is not one of {PATCH_EMBEDDINGS}.")
        self.patch_embed = (
            nnx.Linear(
                self.patch_dim, width, use_bias=config.use_bias, dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=partitioned(nnx.initializers.lecun_normal(), ("patch", "embed")),
                bias_init=partitioned(nnx.initializers.zeros, ("embed",)),
                rngs=rngs,
            )
            if kind == "linear"
            else ConvPatchStem(config.patch_size, config.num_channels, width,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )  # fmt: skip
        self.posemb = PositionalEmbedding(config.posemb, width, param_dtype=param_dtype, rngs=rngs)
        self.blocks, self.final_norm, self.map_head = encoder_stack(sizes, config, rngs=rngs)

    def __call__(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool
    ) -> dict[str, jax.Array]:
        """Packed batch -> {"tokens" [B, L, D], "pooled" [B, E, D], "pooled_valid" [B, E]}."""
        patches, segment_ids = batch["patches"], batch["segment_ids"]
        if patches.shape[-1] != self.patch_dim:
            raise ValueError(
                f"batch['patches'] has {patches.shape[-1]} values per patch but the model "
                f"expects patch_size**2 * num_channels = {self.patch_dim}; make "
                "model.patch_size match data.patch_size."
            )
        token_valid = (segment_ids > 0)[..., None]  # [B, L, 1]
        pixels = unit_range(patches, self.dtype)  # [B, L, P*P*C] in [-1, 1]
        x = self.patch_embed(pixels)  # [B, L, D]
        x = x + self.posemb(batch["patch_coords"], segment_ids, batch["image_grid"]).astype(
            self.dtype
        )
        x = constrain(x, ("act_batch", "act_len", "act_emb"))
        for block in self.blocks:
            x = block(x, segment_ids, deterministic=deterministic)
        tokens = jnp.where(token_valid, self.final_norm(x), 0)  # [B, L, D]
        return pool_examples(
            tokens, segment_ids, batch["example_valid"], self.map_head, self.pooling
        )
