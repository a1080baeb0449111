"""Text tower over packed captions: token + position embedding, the encoder's pre-LN blocks with
segment-masked attention, final norm, masked pooling to one vector per example slot.

Captions are packed like images (NaViT's contrastive setup): a row holds several captions,
`text_segment_ids` e + 1 marks the caption of image slot e, 0 marks padding. Positions restart
at 0 in every caption and are computed here from the segment ids, so the packer needs to send
no position array. Output: `tokens` [B, L_text, D] (zero at padding), `pooled` [B, E_max, D]
(zero at invalid slots) and `pooled_valid` [B, E_max] (the slot is a real example and has at
least one token).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from navit_seq.models.attention import segment_attend_mask
from navit_seq.models.index_check import check_index_below
from navit_seq.models.navit import dtype_of, encoder_stack, model_sizes, pool_examples
from navit_seq.models.partitioning import constrain, param, partitioned
from navit_seq.models.pooling import POOLINGS

_EMBED_INIT = nnx.initializers.normal(stddev=0.02)


def default_text_config() -> ml_collections.ConfigDict:
    """`config.model.text`: the encoder's fields (sizes from the same presets) plus the vocabulary
    and the position table length."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(
        {
            "variant": "S",
            # Set any of these to override the preset (tests use tiny towers).
            **{field: placeholder(int) for field in ("width", "depth", "num_heads", "mlp_dim")},
            # The tokenizer's piece count (`text.Tokenizer(path).vocab_size`); trainers fill it.
            "vocab_size": placeholder(int),
            # Tokens per caption the learned position table covers (NaViT's contrastive text
            # length is 24; longer captions are cut by the packer, never here).
            "max_len": 64,
            "qk_norm": True,
            "use_bias": False,
            "pooling": "map",  # "map" (attention pooling) or "mean"
            "attention_impl": "xla",
            "dropout": 0.0,
            "dtype": "float32",
            "param_dtype": "float32",
        }
    )


def caption_positions(attend: jax.Array) -> jax.Array:
    """Position of each token within its caption [B, L] from the attend mask [B, 1, L, L].

    Token q's position is the number of earlier tokens of its own caption, so it is right for
    any layout of segments; padding tokens (attending to nothing) get 0.
    """
    length = attend.shape[-1]
    earlier = jnp.tril(jnp.ones((length, length), bool), k=-1)  # [L, L]: key k before query q
    return jnp.sum(attend[:, 0] & earlier, axis=-1, dtype=jnp.int32)  # [B, L]


class TextTower(nnx.Module):
    """Transformer over packed SentencePiece tokens (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if config.pooling not in POOLINGS:
            raise ValueError(f"model.text.pooling={config.pooling!r} is not one of {POOLINGS}.")
        if not config.get("vocab_size") or config.vocab_size <= 0:
            raise ValueError(
                f"model.text.vocab_size={config.get('vocab_size')!r}; set it to the tokenizer's "
                "vocab_size (navit_seq.data.text.Tokenizer(path).vocab_size)."
            )
        sizes = model_sizes(config)
        width = sizes["width"]
        dtype, param_dtype = dtype_of(config.dtype), dtype_of(config.param_dtype)
        self.dtype, self.pooling = dtype, config.pooling
        self.vocab_size, self.max_len = config.vocab_size, config.max_len
        self.token_embed = nnx.Embed(
            config.vocab_size, width, dtype=dtype, param_dtype=param_dtype,
            embedding_init=partitioned(_EMBED_INIT, ("vocab", "embed")), rngs=rngs,
        )  # fmt: skip
        self.position_table = param(
            rngs, _EMBED_INIT, ("posemb_len", "embed"), (config.max_len, width), param_dtype
        )
        self.blocks, self.final_norm, self.map_head = encoder_stack(sizes, config, rngs=rngs)

    def __call__(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool
    ) -> dict[str, jax.Array]:
        """batch with `text_tokens` [B, L], `text_segment_ids` [B, L] and `example_valid`
        [B, E] -> {"tokens" [B, L, D], "pooled" [B, E, D], "pooled_valid" [B, E]}."""
        text_tokens, segment_ids = batch["text_tokens"], batch["text_segment_ids"]
        if text_tokens.shape != segment_ids.shape:
            raise ValueError(
                f"batch['text_tokens'] {text_tokens.shape} and batch['text_segment_ids'] "
                f"{segment_ids.shape} must have the same [B, L_text] shape."
            )
        token_valid = segment_ids > 0  # [B, L]
        positions = caption_positions(segment_attend_mask(segment_ids))  # [B, L]
        ids = jnp.where(token_valid, text_tokens, 0)  # [B, L]; padding reads id 0
        vocab_size, max_len = self.vocab_size, self.max_len
        check_index_below(
            ids, vocab_size,
            lambda largest: f"batch['text_tokens'] holds id {largest} but model.text.vocab_size "
            f"is {vocab_size}; set it to the tokenizer's vocab_size.",
        )  # fmt: skip
        check_index_below(
            positions, max_len,
            lambda largest: f"a caption has a token at position {largest} but the text position "
            f"table has {max_len} entries (model.text.max_len); raise it or cut captions shorter.",
        )  # fmt: skip
        # After the checks, clipping only keeps reads in range (jnp.take would fill NaN).
        x = self.token_embed(jnp.clip(ids, 0, self.vocab_size - 1))  # [B, L, D]
        positions = jnp.clip(positions, 0, self.max_len - 1)
        x = x + jnp.take(self.position_table[...], positions, axis=0).astype(self.dtype)
        x = constrain(x, ("act_batch", "act_len", "act_emb"))
        for block in self.blocks:
            x = block(x, segment_ids, deterministic=deterministic)
        tokens = jnp.where(token_valid[..., None], self.final_norm(x), 0)  # [B, L, D]
        return pool_examples(
            tokens, segment_ids, batch["example_valid"], self.map_head, self.pooling
        )
