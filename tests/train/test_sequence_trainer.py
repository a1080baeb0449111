"""The sequence objective: token loss and per-task metrics vs float64 numpy; trains on scenes."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from navit_seq.train import loop, sequence

IDS = {"detection": 1, "captioning": 4}


class FixedLogits:
    """A stand-in model returning given logits (the objective only reads `logits`)."""

    def __init__(self, logits):
        self.logits = jnp.asarray(logits)

    def __call__(self, batch, deterministic):
        return {"logits": self.logits}


def numpy_xent(logits, targets, smoothing=0.0):
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    labels = np.eye(logits.shape[-1])[targets] * (1 - smoothing) + smoothing / logits.shape[-1]
    return -(labels * log_probs).sum(-1)


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 3, 4, 7))
    targets = rng.integers(0, 7, (2, 3, 4))
    weights = rng.choice([0.0, 0.1, 1.0], (2, 3, 4)).astype(np.float32)
    weights[1, 2] = 0  # padding row
    logits[1, 2] = 1e4  # garbage there must not leak
    batch = {
        "decoder_target": jnp.asarray(targets),
        "decoder_weights": jnp.asarray(weights),
        "row_slot": jnp.asarray([[0, 1, 1], [0, 0, -1]], jnp.int32),
        "task_id": jnp.asarray([[1, 4], [4, 0]], jnp.int32),
    }
    return logits, targets, weights, batch


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_loss_sums_and_per_task_losses_match_numpy(case, smoothing):
    logits, targets, weights, batch = case
    config = ml_collections.ConfigDict({"loss": {"label_smoothing": smoothing}})
    loss_sum, weight_sum, metrics = sequence.make_loss(config, IDS)(
        FixedLogits(logits), batch, False
    )
    per_token = numpy_xent(logits, targets, smoothing) * weights
    per_token[1, 2] = 0
    np.testing.assert_allclose(float(loss_sum), per_token.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(weight_sum), weights.sum(), rtol=1e-6)
    scalars = loop.compute_metrics(metrics)
    np.testing.assert_allclose(scalars["loss"], per_token.sum() / weights.sum(), rtol=1e-5)
    # Rows of task 1: (0, 0); of task 4: (0, 1), (0, 2), (1, 0), (1, 1).
    detection, captioning = [(0, 0)], [(0, 1), (0, 2), (1, 0), (1, 1)]
    for name, rows in (("detection", detection), ("captioning", captioning)):
        task_loss = sum(per_token[r].sum() for r in rows)
        task_weight = sum(weights[r].sum() for r in rows)
        np.testing.assert_allclose(scalars[f"loss/{name}"], task_loss / task_weight, rtol=1e-5)
        np.testing.assert_allclose(
            scalars[f"weight_share/{name}"], task_weight / weights.sum(), rtol=1e-5
        )


def test_task_absent_from_the_window_is_left_out_not_logged_as_zero_or_nan(case):
    logits, _, _, batch = case
    eval_metrics = sequence.make_eval_metrics(None, {"keypoints": 3, "detection": 1})
    metrics = eval_metrics(FixedLogits(logits), batch)
    scalars = loop.compute_metrics(metrics)
    assert "loss/keypoints" not in scalars and scalars["weight_share/keypoints"] == 0.0
    assert scalars["loss/detection"] > 0


def sequence_recipe(data_dir: str) -> ml_collections.ConfigDict:
    """Detection + captioning on the scene dataset with a tiny Pix2Seq, 3 steps."""
    from navit_seq import config_utils
    from navit_seq.models.pix2seq import default_pix2seq_config

    config = config_utils.load_config_file("configs/quickstart.py:steps=3")
    config.trainer = "sequence"
    del config["loss"]  # the quickstart's is a classification loss name
    config.loss = sequence.default_loss_config()
    config.loss.label_smoothing = 0.1
    config.data.update(data_dir=data_dir, num_workers=0, batch_size=8, max_rows_per_seq=4)
    config.data.update(tasks=(("detection", 0.5), ("captioning", 0.5)), mixing="batch")
    config.data.task = {"name": "detection", "seq_len": 24}
    model = default_pix2seq_config()
    model.update(variant="Ti", width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=16)
    model.posemb.max_len = config.data.max_grid_side = 16
    # posemb's "error" check passes table_len to jax.debug.callback, which makes it an array;
    # comparing it inside the callback runs a JAX op there and can deadlock a loaded CPU.
    # The grid cap above keeps every position in the table, so "clamp" never clamps here.
    model.posemb.out_of_range = "clamp"
    model.decoder.update(variant="Ti", width=32, depth=1, num_heads=2, mlp_dim=64, max_len=24)
    config.model = model
    config.log_every_steps = 1
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    return config


def test_recipe_fills_the_decoder_vocabulary_from_the_tasks(scenes_data_dir):
    from navit_seq import tasks

    config = sequence_recipe(scenes_data_dir)
    sequence.resolve_config(config)
    task = tasks.get_task(tasks.task_config(config.data, "captioning"))
    assert config.model.decoder.vocab_size == task.vocab.size


def test_decoder_shorter_than_the_rows_is_rejected_naming_both_fields(scenes_data_dir):
    config = sequence_recipe(scenes_data_dir)
    config.model.decoder.max_len = 16
    with pytest.raises(ValueError, match=r"decoder.max_len=16 < data.task.seq_len=24"):
        sequence.resolve_config(config)


def test_objective_gives_a_finite_loss_on_a_pipeline_batch_of_all_four_tasks(scenes_data_dir):
    import jax

    config = sequence_recipe(scenes_data_dir)
    config.data.tasks = tuple((name, 1.0) for name in ("detection", "segmentation", "keypoints",
                                                        "captioning"))  # fmt: skip
    config.data.mixing = "data"
    config.data.task.seq_len = config.model.decoder.max_len = 40  # keypoints: 6 + 34 tokens
    objective = sequence.objective(config)
    batch = loop.model_inputs(next(objective.train_iterator()), objective.batch_keys)
    model = objective.model_fn()
    loss_sum, weight_sum, metrics = jax.jit(lambda b: objective.loss(model, b, True))(batch)
    scalars = loop.compute_metrics(metrics)
    assert float(weight_sum) == pytest.approx(batch["decoder_weights"].sum(), rel=1e-6)
    assert np.isfinite(float(loss_sum)) and float(loss_sum) > 0
    shares = [scalars[f"weight_share/{name}"] for name in sequence.task_ids(config)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow  # ~25-60 s on 2 shared cores: compiles the train and eval steps
def test_sequence_recipe_trains_and_evaluates_on_the_scene_dataset(scenes_data_dir, tmp_path):
    config = sequence_recipe(scenes_data_dir)
    config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    loop.train_and_evaluate(config, tmp_path, sequence.objective(config))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    (evaluation,) = [r for r in rows if r["split"] == "eval"]
    assert len(train) == 3 and all(np.isfinite(r["loss"]) for r in train)
    # Evaluation encodes every image by both tasks: both carry loss weight.
    assert evaluation["weight_share/detection"] > 0 and evaluation["weight_share/captioning"] > 0
    assert np.isfinite(evaluation["loss/detection"]) and np.isfinite(evaluation["loss/captioning"])


def labelled_recipe(data_dir: str, weight: float = 0.5) -> ml_collections.ConfigDict:
    config = sequence_recipe(data_dir)
    config.data.token_labels = config.model.token_labels = True
    config.loss.token_label_weight = weight
    return config


def test_token_labels_add_weight_times_their_sum_and_train_the_encoder(scenes_data_dir):
    """loss_sum = decoder sum + weight * token-label ce sum (same weight_sum); the head's and
    the encoder's gradients are non-zero; the model's class count is filled from the tasks."""
    import jax
    from flax import nnx

    from navit_seq import tasks
    from navit_seq.losses.token_labels import token_label_sums

    config = labelled_recipe(scenes_data_dir, weight=0.5)
    objective = sequence.objective(config)
    want_classes = tasks.num_classes(tasks.task_config(config.data, "detection"))
    assert config.model.num_classes == want_classes
    batch = loop.model_inputs(next(objective.train_iterator()), objective.batch_keys)
    model = objective.model_fn()
    with_labels, weight_sum, metrics = objective.loss(model, batch, True)
    outputs = model(batch, deterministic=True)
    decoder_sum, decoder_weight, _ = sequence.losses.weighted_sums(
        outputs["logits"], batch["decoder_target"], batch["decoder_weights"]
    )
    label_sum, count, _ = token_label_sums(outputs["token_logits"], batch)
    assert float(count) > 0
    np.testing.assert_allclose(float(with_labels), float(decoder_sum + 0.5 * label_sum), rtol=1e-4)
    assert float(weight_sum) == pytest.approx(float(decoder_weight))
    scalars = loop.compute_metrics(metrics)
    assert scalars["loss/token_labels"] == pytest.approx(float(label_sum / count), rel=1e-4)
    assert scalars["loss"] == pytest.approx(float(decoder_sum / decoder_weight), rel=1e-4)
    evaluated = loop.compute_metrics(objective.eval_metrics(model, batch))
    assert evaluated["loss/token_labels"] == pytest.approx(scalars["loss/token_labels"], rel=1e-4)
    assert evaluated["loss"] == pytest.approx(scalars["loss"], rel=1e-4)  # labels not added

    def token_loss(model):
        return token_label_sums(model(batch, deterministic=True)["token_logits"], batch)[0]

    grads = nnx.grad(token_loss)(model)
    assert float(jnp.abs(grads.token_classifier.kernel.value).sum()) > 0
    # The head starts at zero, so one step of it is needed before the encoder feels the labels.
    model.token_classifier.kernel.value = jax.random.normal(
        jax.random.key(0), model.token_classifier.kernel.value.shape
    )
    grads = nnx.grad(token_loss)(model)
    encoder_grads = jax.tree.leaves(nnx.state(grads.encoder, nnx.Param))
    assert sum(float(jnp.abs(g).sum()) for g in encoder_grads) > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data_labels": False}, r"needs token labels, but \['data.token_labels'\] is False"),
        ({"model_labels": False}, r"needs token labels, but \['model.token_labels'\] is False"),
        ({"num_classes": 3}, r"model.num_classes=3 but the tasks have \d+ classes"),
        ({"weight": -1.0}, r"loss.token_label_weight=-1.0; use 0"),
    ],
)
def test_inconsistent_token_label_fields_are_refused_naming_them(scenes_data_dir, change, message):
    config = labelled_recipe(scenes_data_dir, weight=change.get("weight", 0.5))
    config.data.token_labels = change.get("data_labels", True)
    config.model.token_labels = change.get("model_labels", True)
    config.model.num_classes = change.get("num_classes", 0)
    with pytest.raises(ValueError, match=message):
        sequence.resolve_config(config)
