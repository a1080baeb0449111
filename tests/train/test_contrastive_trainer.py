"""The contrastive objective: loss wiring, chunked = plain under a mesh, retrieval metrics over
merged batches, recipe checks, and the recipe training and evaluating on the scene dataset."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from navit_seq.evaluation import retrieval
from navit_seq.losses import contrastive as losses
from navit_seq.train import contrastive, loop

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "contrastive.py"
BATCH, SLOTS, WIDTH = 8, 3, 6


def recipe(arg: str | None = None):
    spec = importlib.util.spec_from_file_location("contrastive_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def fixed_outputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Two-tower outputs of a batch [BATCH, SLOTS] with some padding pairs."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    valid = rng.random((BATCH, SLOTS)) < 0.7
    image = unit(rng.normal(size=(BATCH, SLOTS, WIDTH))).astype(np.float32)
    text = unit(image + rng.normal(size=image.shape)).astype(np.float32)
    return {
        "image_emb": np.where(valid[..., None], image, 0),
        "text_emb": np.where(valid[..., None], text, 0),
        "pair_valid": valid,
        "temperature": np.float32(0.1),
        "bias": np.float32(-3.0),
    }


class FixedOutputs:
    """A stand-in model returning given outputs (the objective reads only these keys)."""

    def __init__(self, outputs):
        self.outputs = jax.tree.map(jnp.asarray, outputs)

    def __call__(self, batch, deterministic):
        return self.outputs


@pytest.mark.parametrize("name", contrastive.LOSSES)
def test_loss_is_the_batch_loss_times_valid_pairs_with_their_count(name):
    config = recipe(f"loss={name}")
    outputs = fixed_outputs()
    loss_sum, weight, metrics = contrastive.make_loss(config)(FixedOutputs(outputs), {}, False)
    flat = lambda key: outputs[key].reshape(-1, WIDTH)
    valid = outputs["pair_valid"].reshape(-1)
    if name == "sigmoid":
        expected = losses.sigmoid_contrastive_loss(
            flat("image_emb"), flat("text_emb"), valid, 0.1, -3.0
        )
    else:
        expected = losses.softmax_contrastive_loss(flat("image_emb"), flat("text_emb"), valid, 0.1)
    assert weight == valid.sum() > 0
    np.testing.assert_allclose(loss_sum, expected * valid.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"].compute(), expected, rtol=1e-6)
    assert metrics["temperature"].compute() == pytest.approx(0.1)


@pytest.mark.parametrize("name", contrastive.LOSSES)
def test_chunked_loss_under_the_mesh_equals_the_plain_loss(name):
    plain, chunked = recipe(f"loss={name}"), recipe(f"loss={name}")
    chunked.loss.chunked = True
    outputs = fixed_outputs(1)
    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        got = jax.jit(contrastive.batch_loss_fn(chunked))(outputs)
    np.testing.assert_allclose(got, contrastive.batch_loss_fn(plain)(outputs), rtol=1e-5)


def test_recall_metrics_over_merged_batches_equal_retrieval_over_all_valid_pairs():
    first, second = fixed_outputs(2), fixed_outputs(3)
    eval_metrics = contrastive.make_eval_metrics(recipe())
    merged = loop.merge_metrics(
        eval_metrics(FixedOutputs(first), {}), eval_metrics(FixedOutputs(second), {})
    )
    pick = lambda key: np.concatenate([o[key][o["pair_valid"]] for o in (first, second)])  # [n, D]
    image, text = pick("image_emb"), pick("text_emb")
    expected = retrieval.retrieval_recall(image, text, np.arange(len(text)))
    for name in contrastive.RECALL_METRICS:
        assert merged[name].compute() == pytest.approx(expected[name]), name
    assert 0 < expected["text_to_image/recall@1"] < 1


def test_gradient_accumulation_is_refused_naming_the_fix():
    config = recipe()
    config.optimizer.grad_accum_steps = 2
    with pytest.raises(ValueError, match="config.loss.chunked=True"):
        contrastive.resolve_config(config)


def test_a_task_other_than_image_text_is_refused():
    config = recipe()
    config.data.task = dict(name="classification", num_classes=0)
    with pytest.raises(ValueError, match="'image_text' task"):
        contrastive.resolve_config(config)


@pytest.fixture(scope="module")
def scenes_recipe(scenes_data_dir):
    config = recipe("steps=2")
    config.data.data_dir = scenes_data_dir
    config.data.batch_size = 8
    config.data.num_workers = 0
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 0
    return config


def test_recipe_trains_and_reports_retrieval_recalls_on_scenes(scenes_recipe, tmp_path):
    objective = contrastive.objective(scenes_recipe)
    assert scenes_recipe.model.text.vocab_size > 10  # filled from the dataset's tokenizer
    train = loop.train_and_evaluate(scenes_recipe, tmp_path, objective)
    assert np.isfinite(train["loss"]) and train["pairs_per_step"] > 8
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [row for row in rows if row["split"] == "eval"]
    assert np.isfinite(evaluation["loss"])
    for name in contrastive.RECALL_METRICS:
        assert 0 <= evaluation[name] <= 1, name
    # 8 validation images: every caption is within the first 10 images.
    assert evaluation["image_to_text/recall@10"] == evaluation["text_to_image/recall@10"] == 1
    # The scenes have class names: zero-shot accuracy and its chance level at every eval.
    assert 0 <= evaluation["zero_shot/top1_accuracy"] <= 1
    assert 0 < evaluation["zero_shot/chance_top1"] < evaluation["zero_shot/chance_top5"] <= 1


def test_zero_shot_classification_scores_every_validation_image(scenes_recipe):
    contrastive.resolve_config(scenes_recipe)
    model = contrastive.model_fn(scenes_recipe)()
    results = contrastive.zero_shot_classification(model, scenes_recipe, ks=(1, 5))
    assert results["num_images"] == 8
    assert 0 <= results["zero_shot/top1_accuracy"] <= results["zero_shot/top5_accuracy"] <= 1
