"""NaViT encoder + linear classification head on the pooled per-example vectors."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from navit_seq.models.navit import NaViT, dtype_of, model_sizes
from navit_seq.models.partitioning import constrain, partitioned


class Classifier(nnx.Module):
    """Adds `logits` [B, E_max, num_classes] (zero for empty slots) to the encoder outputs."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if config.pooling == "none":
            raise ValueError(
                "model.pooling='none' gives no per-example vector to classify; use 'map' or 'mean'."
            )
        self.encoder = NaViT(config, rngs=rngs)
        # Zero-initialised kernel (big_vision's head_zeroinit); the bias sets the initial
        # prior, e.g. -log(num_classes) or -10 for sigmoid cross-entropy over many classes.
        self.head = nnx.Linear(
            model_sizes(config)["width"],
            config.num_classes,
            dtype=dtype_of(config.dtype),
            param_dtype=dtype_of(config.param_dtype),
            kernel_init=partitioned(nnx.initializers.zeros, ("embed", "classes")),
            bias_init=partitioned(nnx.initializers.constant(config.head_bias_init), ("classes",)),
            rngs=rngs,
        )

    def __call__(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool
    ) -> dict[str, jax.Array]:
        """Packed batch -> encoder outputs plus "logits" [B, E, num_classes] in float32."""
        outputs = self.encoder(batch, deterministic=deterministic)
        logits = self.head(outputs["pooled"]).astype(jnp.float32)  # [B, E, C]
        logits = jnp.where(outputs["pooled_valid"][..., None], logits, 0)
        logits = constrain(logits, ("act_batch", "act_examples", None))
        return {**outputs, "logits": logits}
