"""Two-tower image-text model: NaViT image tower + packed text tower, linear projections to a
shared space, L2-normalised per-example embeddings and a learned temperature and bias.

Image slot e of a packed row pairs with the caption whose text segment id is e + 1. Outputs
(all [B, E_max, ...] per slot): `image_emb`, `text_emb` (float32, unit norm, zero where their
own tower's slot is invalid), `image_valid`, `text_valid`, `pair_valid = image_valid &
text_valid` (the mask the contrastive loss takes: padding pairs are never positives or
negatives), plus scalars `temperature` (logits = <img, txt> / temperature) and `bias` (used
by the sigmoid loss).
The temperature is log-parameterised as in CLIP/SigLIP: temperature = exp(-t), t learned.
"""

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from navit_seq.models.navit import NaViT, default_model_config, dtype_of, model_sizes
from navit_seq.models.partitioning import constrain, param, partitioned
from navit_seq.models.text import TextTower, default_text_config

# Initial logit scale (1 / temperature) and bias per loss. SigLIP: t' = log 10, b = -10 (the
# bias makes the many negatives start near their target); CLIP: scale 1 / 0.07, no bias.
LOSS_INITS = {"sigmoid": (10.0, -10.0), "softmax": (1.0 / 0.07, 0.0)}
# Squared norms below this are treated as zero vectors (no division blow-up at padding).
_MIN_SQUARED_NORM = 1e-12


def default_two_tower_config(loss: str = "sigmoid") -> ml_collections.ConfigDict:
    """`config.model` of a two-tower recipe: `image` (NaViT), `text` (text tower), the shared
    embedding width and the initial logit scale and bias for `loss` ("sigmoid" or "softmax")."""
    if loss not in LOSS_INITS:
        raise ValueError(f"loss={loss!r} is not one of {tuple(LOSS_INITS)}.")
    logit_scale, bias = LOSS_INITS[loss]
    return ml_collections.ConfigDict(
        {
            "image": default_model_config(),
            "text": default_text_config(),
            "embed_dim": 384,  # width of the shared embedding space
            "logit_scale_init": logit_scale,
            "bias_init": bias,
        }
    )


def l2_normalize(x: jax.Array) -> jax.Array:
    """x [..., D] -> float32 unit vectors; an all-zero vector stays zero (never NaN)."""
    x = x.astype(jnp.float32)
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, _MIN_SQUARED_NORM))


class TwoTower(nnx.Module):
    """Image and text towers with projections (see the module docstring for outputs)."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if config.image.pooling == "none":
            raise ValueError(
                "model.image.pooling='none' gives no per-image vector to embed; use 'map' or "
                "'mean'."
            )
        if config.logit_scale_init <= 0:
            raise ValueError(
                f"model.logit_scale_init={config.logit_scale_init} must be > 0 "
                "(it is 1 / temperature; SigLIP uses 10, CLIP 1 / 0.07)."
            )
        self.image_tower = NaViT(config.image, rngs=rngs)
        self.text_tower = TextTower(config.text, rngs=rngs)
        projection = lambda tower_config: nnx.Linear(
            model_sizes(tower_config)["width"], config.embed_dim, use_bias=False,
            dtype=dtype_of(tower_config.dtype), param_dtype=dtype_of(tower_config.param_dtype),
            kernel_init=partitioned(nnx.initializers.lecun_normal(), ("embed", None)),
            rngs=rngs,
        )  # fmt: skip
        self.image_projection = projection(config.image)
        self.text_projection = projection(config.text)
        constant = lambda value: nnx.initializers.constant(value)
        self.log_logit_scale = param(rngs, constant(math.log(config.logit_scale_init)), (), ())
        self.bias = param(rngs, constant(config.bias_init), (), ())

    def _embed(
        self, tower: nnx.Module, projection: nnx.Linear, batch: Mapping[str, jax.Array],
        deterministic: bool,
    ) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        outputs = tower(batch, deterministic=deterministic)
        valid = outputs["pooled_valid"]  # [B, E]
        embedding = l2_normalize(projection(outputs["pooled"]))  # [B, E, D_emb]
        embedding = jnp.where(valid[..., None], embedding, 0.0)
        return constrain(embedding, ("act_batch", "act_examples", None)), valid

    def embed_images(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool
    ) -> tuple[jax.Array, jax.Array]:
        """Packed image batch -> (unit embeddings [B, E, D_emb], image_valid [B, E])."""
        return self._embed(self.image_tower, self.image_projection, batch, deterministic)

    def embed_texts(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool
    ) -> tuple[jax.Array, jax.Array]:
        """Packed text batch (`text_tokens`, `text_segment_ids`, `example_valid`) ->
        (unit embeddings [B, E, D_emb], text_valid [B, E])."""
        return self._embed(self.text_tower, self.text_projection, batch, deterministic)

    def __call__(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool
    ) -> dict[str, jax.Array]:
        """Packed image-caption batch -> embeddings, validity masks, temperature and bias."""
        image_emb, image_valid = self.embed_images(batch, deterministic=deterministic)
        text_emb, text_valid = self.embed_texts(batch, deterministic=deterministic)
        pair_valid = image_valid & text_valid  # [B, E]
        return {
            "image_emb": image_emb,
            "text_emb": text_emb,
            "image_valid": image_valid,
            "text_valid": text_valid,
            "pair_valid": pair_valid,
            "temperature": jnp.exp(-self.log_logit_scale[...].astype(jnp.float32)),
            "bias": self.bias[...].astype(jnp.float32),
        }
