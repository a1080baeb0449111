"""The image-text contrastive objective (NaViT's contrastive pretraining; SigLIP / CLIP losses).

Plugs into the shared loop (`navit_seq.train.loop`) like `classification`: the two-tower model
(`navit_seq.models.two_tower`), the loss over the global batch's valid pairs, eval metrics and
grain iterators over the `image_text` task (each image's caption packed into `text_tokens` /
`text_segment_ids`, docs/architecture.md §3).

- `config.loss.name`: "sigmoid" (SigLIP) or "softmax" (CLIP); `config.loss.chunked`: the ring
  form of `navit_seq.losses.contrastive` over the batch's mesh axes, so no device holds the
  global [N, N] logits (N = batch_size * max_examples_per_seq, divisible by the batch shards).
- Every pair of the global batch is a negative for every other, so gradient accumulation
  (which would shrink the negatives to one micro-batch) is refused; `chunked` saves memory.
- Eval: the loss per batch, and image<->text retrieval recall@1/5/10 over the whole eval split
  (embeddings collected on the host; one caption per image, ties against the model).
  `zero_shot_classification` scores class-name prompts against the eval images: the
  objective's whole-split evaluation (at every eval, `config.evaluation.every_steps` to thin
  it out, and in `navit_seq.evaluate`) when the dataset has class names.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx

from navit_seq import pipeline, sharding
from navit_seq.evaluation import retrieval
from navit_seq.losses import contrastive as losses
from navit_seq.train.loop import IMAGE_KEYS, MetricDict, Objective, close_iterator, model_inputs

LOSSES = ("sigmoid", "softmax")
# What the two towers read: the packed images and each slot's caption tokens.
BATCH_KEYS = (*IMAGE_KEYS, "text_tokens", "text_segment_ids")


def default_loss_config() -> ml_collections.ConfigDict:
    """`config.loss`: SigLIP's sigmoid loss; `chunked` for batches too large for [N, N] logits."""
    return ml_collections.ConfigDict({"name": "sigmoid", "chunked": False})


def batch_loss_fn(config: ml_collections.ConfigDict):
    """loss(outputs of TwoTower) -> scalar mean over valid pairs, by `config.loss`."""
    name, chunked = config.loss.name, config.loss.chunked
    if name not in LOSSES:
        raise ValueError(f"config.loss.name={name!r} is not one of {LOSSES}.")
    batch_axes = dict(sharding.logical_rules(config.mesh)).get("act_batch")

    def loss(outputs: Mapping[str, jax.Array]) -> jax.Array:
        width = outputs["image_emb"].shape[-1]
        image = outputs["image_emb"].reshape(-1, width)  # [N, D_emb], N = B * E
        text = outputs["text_emb"].reshape(-1, width)
        valid = outputs["pair_valid"].reshape(-1)  # [N]
        temperature, bias = outputs["temperature"], outputs["bias"]
        if chunked:
            # The mesh of the running step (the trainer sets it around tracing).
            ring = dict(mesh=jax.sharding.get_abstract_mesh(), axis_name=batch_axes)
            if name == "sigmoid":
                return losses.chunked_sigmoid_contrastive_loss(
                    image, text, valid, temperature, bias, **ring
                )
            return losses.chunked_softmax_contrastive_loss(image, text, valid, temperature, **ring)
        if name == "sigmoid":
            return losses.sigmoid_contrastive_loss(image, text, valid, temperature, bias)
        return losses.softmax_contrastive_loss(image, text, valid, temperature)

    return loss


def make_loss(config: ml_collections.ConfigDict):
    """loss(model, batch, deterministic) -> (loss x #valid pairs, #valid pairs, metrics).

    The loop divides the gradient by the second value, so the step follows the gradient of
    the batch loss itself (a mean over the valid pairs of the whole global batch).
    """
    batch_loss = batch_loss_fn(config)

    def loss(
        model: nnx.Module, batch: Mapping[str, Any], deterministic: bool
    ) -> tuple[jax.Array, jax.Array, MetricDict]:
        outputs = model(batch, deterministic=deterministic)
        value = batch_loss(outputs)
        num_pairs = jnp.sum(outputs["pair_valid"]).astype(jnp.float32)
        metrics = {
            "loss": clu_metrics.Average.from_model_output(value),
            "temperature": clu_metrics.LastValue.from_model_output(outputs["temperature"]),
            "bias": clu_metrics.LastValue.from_model_output(outputs["bias"]),
            "pairs_per_step": clu_metrics.Average.from_model_output(num_pairs),
        }
        return value * num_pairs, num_pairs, metrics

    return loss


def _recall_metric(direction: str, k: int) -> type[clu_metrics.CollectingMetric]:
    """A clu metric collecting the eval split's embeddings on the host; computes one recall.

    Caption i of the collected pairs belongs to image i (one caption per image at eval).
    """
    base = clu_metrics.CollectingMetric.from_outputs(("image_emb", "text_emb", "pair_valid"))

    @flax.struct.dataclass
    class Recall(base):
        def compute(self) -> float:
            values = super().compute()
            valid = values["pair_valid"].reshape(-1)
            width = values["image_emb"].shape[-1]
            image = values["image_emb"].reshape(-1, width)[valid]
            text = values["text_emb"].reshape(-1, width)[valid]
            recalls = retrieval.retrieval_recall(image, text, np.arange(len(text)), ks=(k,))
            return recalls[f"{direction}/recall@{k}"]

    return Recall


RECALL_METRICS = {
    f"{direction}/recall@{k}": _recall_metric(direction, k)
    for direction in ("image_to_text", "text_to_image")
    for k in retrieval.RECALL_KS
}


def make_eval_metrics(config: ml_collections.ConfigDict):
    """The batch loss, and retrieval recalls over every eval pair (no dropout)."""
    batch_loss = batch_loss_fn(config)

    def eval_metrics(model: nnx.Module, batch: Mapping[str, Any]) -> MetricDict:
        outputs = model(batch, deterministic=True)
        collected = {k: outputs[k] for k in ("image_emb", "text_emb", "pair_valid")}
        metrics = {
            name: metric.from_model_output(**collected) for name, metric in RECALL_METRICS.items()
        }
        metrics["loss"] = clu_metrics.Average.from_model_output(batch_loss(outputs))
        return metrics

    return eval_metrics


def resolve_config(config: ml_collections.ConfigDict) -> None:
    """Fills model.text.vocab_size from the tokenizer and checks the recipe is consistent."""
    if config.data.task.name != "image_text":
        raise ValueError(
            f"config.data.task.name={config.data.task.name!r}; the contrastive trainer reads "
            "captions through the 'image_text' task."
        )
    if config.optimizer.get("grad_accum_steps", 1) != 1:
        raise ValueError(
            f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}: micro-batches "
            "would shrink the contrastive negatives to one micro-batch; use 1 and set "
            "config.loss.chunked=True to fit a large batch in memory."
        )
    pipeline.check_model_patch_size(
        config.model.image.patch_size, config.data, "config.model.image.patch_size"
    )
    max_text_len = config.data.task.get("max_text_len", 24)
    if max_text_len > config.model.text.max_len:
        raise ValueError(
            f"config.data.task.max_text_len={max_text_len} exceeds the text position table "
            f"(config.model.text.max_len={config.model.text.max_len}); raise the latter."
        )
    if not config.model.text.get("vocab_size"):
        with config.unlocked():
            config.model.text.vocab_size = task_of(config).tokenizer.vocab_size


def task_of(config: ml_collections.ConfigDict):
    """The recipe's `image_text` task (its tokenizer tokenizes captions and prompts alike)."""
    from navit_seq import tasks

    return tasks.get_task(tasks.task_config(config.data, config.data.task.name))


def model_fn(config: ml_collections.ConfigDict):
    """Builds the two-tower model of `config.model` with parameters from `config.seed`."""
    from navit_seq.models.two_tower import TwoTower

    return lambda: TwoTower(config.model, rngs=nnx.Rngs(config.seed))


def zero_shot_classification(
    model: nnx.Module,
    config: ml_collections.ConfigDict,
    *,
    templates: Sequence[str] = retrieval.DEFAULT_TEMPLATES,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Zero-shot top-k accuracy on the eval split: each image against one prompt embedding per
    class name of the dataset (multi-label: a hit when any of its classes ranks within k).

    Single-process: images are read with the classification task (multi-hot labels) at the
    eval token budget; prompts are tokenized like the training captions.
    """
    from navit_seq.data import sources

    names = sources.class_names(config.data.name, config.data.data_dir)
    if not names:
        raise ValueError(
            f"dataset {config.data.name!r} has no class names; zero-shot classification needs "
            "labelled images (e.g. the scene or a COCO-format dataset)."
        )
    task = task_of(config)
    tokenize = lambda prompt: task.tokenizer.encode(prompt)[: task.max_text_len]
    embed_texts = jax.jit(lambda batch: model.embed_texts(batch, deterministic=True))
    class_emb = retrieval.class_embeddings(
        embed_texts, tokenize, names, seq_len=task.max_text_len, templates=templates
    )  # [C, D]
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.task = dict(name="classification", num_classes=len(names))
    embed_images = jax.jit(lambda batch: model.embed_images(batch, deterministic=True))
    image_emb, labels = [], []
    batches = iter(pipeline.split_dataset(data_config, data_config.eval_split, train=False))
    try:
        for batch in batches:
            embeddings, valid = jax.device_get(embed_images(model_inputs(batch, IMAGE_KEYS)))
            image_emb.append(embeddings[valid])  # [n, D]
            labels.append(batch["targets"]["labels"][valid] > 0.5)  # [n, C]
    finally:
        close_iterator(batches)  # stops the grain workers now
    return retrieval.zero_shot_accuracy(
        np.concatenate(image_emb), class_emb, np.concatenate(labels), ks=ks
    )


def objective(config: ml_collections.ConfigDict) -> Objective:
    """The contrastive objective of a recipe (`config.trainer = "contrastive"`)."""
    resolve_config(config)
    return Objective(
        batch_keys=BATCH_KEYS,
        model_fn=model_fn(config),
        loss=make_loss(config),
        eval_metrics=make_eval_metrics(config),
        train_iterator=lambda: pipeline.train_batches(config.data),
        eval_iterator=lambda: pipeline.eval_batches(config.data),
        evaluate_split=zero_shot_evaluation(config),
    )


def zero_shot_evaluation(config: ml_collections.ConfigDict):
    """The whole-split metrics of the loop and `navit_seq.evaluate`: zero-shot accuracy with
    its chance level, for datasets with class names; None (retrieval only) for caption-only
    ones (e.g. an image-text dataset without labels)."""
    from navit_seq.data import sources

    if not sources.class_names(config.data.name, config.data.data_dir):
        return None
    return lambda model, step: zero_shot_classification(model, config)
