"""Pix2Seq v2 over Patch n' Pack: the NaViT encoder reads the packed images once, the decoder
reads decoder rows, each cross-attending only to the tokens of its own image.

Input: the packed batch (docs/architecture.md §3) plus `decoder_input [B, R, T]` and
`row_slot [B, R]` (§9). Output: the encoder's outputs plus `logits [B, R, T, vocab]`.

Between them sits the decoder's memory (`model.decoder.memory = "projected"`, as Pix2Seq's
reference model does): the encoder tokens projected to the decoder width, LayerNormed, given
a position embedding of their own (fractional sinusoidal: the frame the box targets are
normalised in, whatever the image's grid) and passed through a residual MLP. "encoder" feeds
the encoder tokens to cross-attention as they are.

With `model.token_labels`, a linear head on the encoder tokens also gives `token_logits
[B, L, 1 + num_classes]` (background first): the target of the token-label loss
(navit_seq.data.token_labels), a dense recognition signal for the encoder; `model.num_classes`
is then the dataset's class count (0: filled from the tasks' vocabulary by the objective).

YOLOR implicit knowledge (`model.implicit`, navit_seq.models.implicit; off by default) may be
combined with the memory (alignment) and with the decoder output (refinement, per task).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from navit_seq.models import implicit as implicit_lib
from navit_seq.models.decoder import (
    MEMORIES,
    MEMORY_POSEMB_LEN,
    Decoder,
    decoder_sizes,
    default_decoder_config,
)
from navit_seq.models.index_check import check_index_below
from navit_seq.models.navit import MLP, NaViT, default_model_config, dtype_of, model_sizes
from navit_seq.models.partitioning import constrain, layer_norm, partitioned
from navit_seq.models.posemb import PositionalEmbedding, default_posemb_config


def default_pix2seq_config() -> ml_collections.ConfigDict:
    """`config.model`: the encoder's fields (no pooling: the decoder reads every token) plus
    `decoder` (navit_seq.models.decoder.default_decoder_config). A recipe may add `implicit`
    (navit_seq.models.implicit.default_implicit_config); without it there is none."""
    config = default_model_config()
    config.pooling = "none"
    config.token_labels = False  # a token-label head on the encoder tokens (module docstring)
    config.num_classes = 0  # classes of the token-label head; 0: the tasks' (resolve_config)
    config.decoder = default_decoder_config()
    return config


def memory_posemb_config() -> ml_collections.ConfigDict:
    """The memory's position embedding: sinusoidal in fractional coordinates (never out of
    range, and a bin of a box target is the same place at every grid size)."""
    config = default_posemb_config()
    config.embedding, config.coords = "sinusoidal", "fractional"
    config.max_len = MEMORY_POSEMB_LEN
    return config


class DecoderMemory(nnx.Module):
    """Encoder tokens [B, L, D_enc] -> the decoder's memory [B, L, D_dec] (module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, encoder_width: int, *, rngs: nnx.Rngs):
        decoder = config.decoder
        width = decoder_sizes(decoder)["width"]
        dtype, param_dtype = dtype_of(decoder.dtype), dtype_of(decoder.param_dtype)
        self.projection = nnx.Linear(
            encoder_width, width, use_bias=decoder.use_bias, dtype=dtype,
            param_dtype=param_dtype,
            # Input and output are both model widths; the output carries the decoder's "embed"
            # (one logical name may shard only one dimension of a kernel).
            kernel_init=partitioned(nnx.initializers.xavier_uniform(), (None, "embed")),
            bias_init=partitioned(nnx.initializers.zeros, ("embed",)),
            rngs=rngs,
        )  # fmt: skip
        norm = lambda: layer_norm(
            width, "embed", use_bias=decoder.use_bias, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )  # fmt: skip
        self.projection_norm = norm()
        self.posemb = PositionalEmbedding(memory_posemb_config(), width, param_dtype=param_dtype,
                                          rngs=rngs)  # fmt: skip
        self.mlp_norm = norm()
        self.mlp = MLP(
            width, decoder_sizes(decoder)["mlp_dim"], use_bias=decoder.use_bias, dropout=0.0,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(self, tokens: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        memory = self.projection_norm(self.projection(tokens))  # [B, L, D_dec]
        positions = self.posemb(batch["patch_coords"], batch["segment_ids"], batch["image_grid"])
        memory = memory + positions.astype(memory.dtype)
        memory = memory + self.mlp(self.mlp_norm(memory))
        memory = jnp.where((batch["segment_ids"] > 0)[..., None], memory, 0)
        return constrain(memory, ("act_batch", "act_len", "act_emb"))


def token_classifier(
    config: ml_collections.ConfigDict, encoder_width: int, *, rngs: nnx.Rngs
) -> nnx.Linear:
    """The token-label head: encoder tokens [B, L, D_enc] -> [B, L, 1 + num_classes]."""
    if config.num_classes < 1:
        raise ValueError(
            f"model.token_labels=True with model.num_classes={config.num_classes}; set the "
            "dataset's class count (the sequence objective fills 0 from the tasks)."
        )
    return nnx.Linear(
        encoder_width, 1 + config.num_classes, dtype=dtype_of(config.dtype),
        param_dtype=dtype_of(config.param_dtype),
        kernel_init=partitioned(nnx.initializers.zeros, ("embed", "classes")),
        bias_init=partitioned(nnx.initializers.zeros, ("classes",)), rngs=rngs,
    )  # fmt: skip


class Pix2Seq(nnx.Module):
    """NaViT encoder + sequence decoder (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if "decoder" not in config:
            raise ValueError(
                "config.model has no `decoder` section; start from "
                "navit_seq.models.pix2seq.default_pix2seq_config()."
            )
        # A config.json saved before `memory` existed describes a model that read the encoder
        # tokens directly: its checkpoints restore with "encoder".
        memory = config.decoder.get("memory", "encoder")
        if memory not in MEMORIES:
            raise ValueError(f"model.decoder.memory={memory!r} is not one of {MEMORIES}.")
        encoder_width = model_sizes(config)["width"]
        self.encoder = NaViT(config, rngs=rngs)
        self.memory = (
            DecoderMemory(config, encoder_width, rngs=rngs) if memory == "projected" else None
        )
        memory_width = (
            encoder_width if self.memory is None else decoder_sizes(config.decoder)["width"]
        )
        implicit = implicit_lib.implicit_config(config)
        self.num_tasks = implicit.num_tasks if implicit_lib.reads_row_task(implicit) else None
        self.decoder = Decoder(
            config.decoder, memory_width + implicit_lib.appended_width(implicit), rngs=rngs,
            implicit=implicit,
        )  # fmt: skip
        # Last, so the explicit parameters start the same with or without it.
        self.implicit_alignment = implicit_lib.alignment(
            implicit, memory_width, param_dtype=dtype_of(config.decoder.param_dtype), rngs=rngs
        )
        self.token_classifier = (
            token_classifier(config, encoder_width, rngs=rngs)
            if config.get("token_labels", False)
            else None
        )

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
        outputs = self.encode(batch, deterministic=deterministic)
        if self.token_classifier is not None:  # training's target only: not in `encode`
            token_logits = self.token_classifier(outputs["tokens"]).astype(jnp.float32)
            outputs = {**outputs, "token_logits": token_logits}  # [B, L, 1 + C]
        logits = self.decoder(
            batch["decoder_input"], outputs["memory"], batch["segment_ids"], batch["row_slot"],
            deterministic=deterministic, row_task=self.row_tasks(batch),
        )  # fmt: skip
        return {**outputs, "logits": logits}

    def encode(self, batch: Mapping[str, jax.Array], *, deterministic: bool) -> dict:
        """The encoder's outputs (§4) plus "memory" [B, L, D]: what the decoder reads."""
        outputs = self.encoder(batch, deterministic=deterministic)
        tokens = outputs["tokens"]
        memory = tokens if self.memory is None else self.memory(tokens, batch)
        if self.implicit_alignment is not None:  # YOLOR feature alignment
            memory = implicit_lib.align(self.implicit_alignment, memory, batch["segment_ids"] > 0)
        return {**outputs, "memory": memory}

    def row_tasks(self, batch: Mapping[str, jax.Array]) -> jax.Array | None:
        """[B, R] task id of each decoder row, `task_id[b, row_slot[b, r]]` (§3; a padding row
        reads slot 0's, its logits are zero), or None when nothing in the model is per task."""
        if self.num_tasks is None:
            return None
        if "task_id" not in batch:
            raise ValueError(
                "batch has no 'task_id' [B, E_max]: this model is per task (model.implicit); "
                "pack the batch with navit_seq.pipeline or give each image slot its task id."
            )
        slot = jnp.maximum(batch["row_slot"], 0)  # [B, R]
        row_task = jnp.take_along_axis(jnp.asarray(batch["task_id"]), slot, axis=1)
        check_index_below(row_task, self.num_tasks, lambda task: (
            f"a decoder row has task id {task} >= model.implicit.num_tasks={self.num_tasks}; "
            "raise num_tasks above the recipe's largest task id."
        ))  # fmt: skip
        return row_task
