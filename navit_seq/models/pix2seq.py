"""Pix2Seq v2 over Patch n' Pack: the NaViT encoder reads the packed images once, the decoder
reads decoder rows, each cross-attending only to the tokens of its own image.

Input: the packed batch (docs/architecture.md §3) plus `decoder_input [B, R, T]` and
`row_slot [B, R]` (§9). Output: the encoder's outputs plus `logits [B, R, T, vocab]`.
"""

from collections.abc import Mapping

import jax
import ml_collections
from flax import nnx

from navit_seq.models.decoder import Decoder, default_decoder_config
from navit_seq.models.navit import NaViT, default_model_config, model_sizes


def default_pix2seq_config() -> ml_collections.ConfigDict:
    """`config.model`: the encoder's fields (no pooling: the decoder reads every token) plus
    `decoder` (navit_seq.models.decoder.default_decoder_config)."""
    config = default_model_config()
    config.pooling = "none"
    config.decoder = default_decoder_config()
    return config


class Pix2Seq(nnx.Module):
    """NaViT encoder + sequence decoder (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if "decoder" not in config:
            raise ValueError(
                "config.model has no `decoder` section; start from "
                "navit_seq.models.pix2seq.default_pix2seq_config()."
            )
        self.encoder = NaViT(config, rngs=rngs)
        self.decoder = Decoder(config.decoder, model_sizes(config)["width"], rngs=rngs)

    def __call__(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool
    ) -> dict[str, jax.Array]:
        """Packed batch with decoder rows -> encoder outputs + "logits" [B, R, T, V] (float32)."""
        for key in ("decoder_input", "row_slot"):
            if key not in batch:
                raise ValueError(
                    f"batch has no {key!r}: Pix2Seq needs decoder rows (docs/architecture.md §9); "
                    "use a sequence task in data.task."
                )
        outputs = self.encoder(batch, deterministic=deterministic)
        logits = self.decoder(
            batch["decoder_input"], outputs["tokens"], batch["segment_ids"], batch["row_slot"],
            deterministic=deterministic,
        )  # fmt: skip
        return {**outputs, "logits": logits}
