"""Per-task inference with a tiny untrained Pix2Seq on the scene dataset; mask averaging."""

import numpy as np
import pytest

from navit_seq import inference

TASKS = ("detection", "segmentation", "keypoints", "captioning")


def tiny_recipe(data_dir: str):
    """All four sequence tasks, a 1-layer 32-wide Pix2Seq, 2 images per decoder call."""
    from navit_seq import config_utils
    from navit_seq.models.pix2seq import default_pix2seq_config
    from navit_seq.train import sequence

    config = config_utils.load_config_file("configs/quickstart.py:steps=3")
    del config["loss"]
    config.trainer = "sequence"
    config.loss = sequence.default_loss_config()  # the quickstart's is a classification loss
    config.data.update(data_dir=data_dir, num_workers=0, seq_len=64, eval_max_tokens=64)
    config.data.tasks = tuple((name, 1.0) for name in TASKS)
    config.data.task = {"name": "detection", "seq_len": 40}  # keypoints need 6 + 34
    model = default_pix2seq_config()
    model.update(variant="Ti", width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=16)
    model.posemb.max_len = config.data.max_grid_side = 16
    model.posemb.out_of_range = "clamp"  # see tests/train/test_sequence_trainer.py
    model.decoder.update(variant="Ti", width=32, depth=1, num_heads=2, mlp_dim=64, max_len=40)
    config.model = model
    config.evaluation = inference.default_evaluation_config()
    config.evaluation.update(num_images=3, images_per_batch=2, max_instances=3, segm_samples=2)
    config.evaluation.detection_top_p = 1.0  # sampling: an untrained model's argmax may be FAKE
    sequence.resolve_config(config)
    return config


def tiny_detection_run(data_dir: str, steps: int = 2):
    """`tiny_recipe` detection-only for `steps` training steps on one device (the experiment
    scripts' smoke tests)."""
    config = tiny_recipe(data_dir)
    config.data.tasks = (("detection", 1.0),)
    config.data.update(batch_size=4, max_rows_per_seq=2)
    config.update(num_train_steps=steps, log_every_steps=1)
    config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    return config


@pytest.fixture(scope="module")
def recipe_and_model(scenes_data_dir):
    from navit_seq.train import sequence

    config = tiny_recipe(scenes_data_dir)
    return config, sequence.model_fn(config)()


def test_codec_grammars_allow_end_only_where_a_response_may_stop(recipe_and_model):
    """Detection decodes to the row's full length (every group a box, Pix2Seq's inference)."""
    from navit_seq.tasks.sequence import sequence_tasks
    from navit_seq.tasks.vocab import END, Vocab

    config, _ = recipe_and_model
    codecs = {task.name: task.codec for task in sequence_tasks(config.data)}
    vocab = codecs["detection"].vocab
    coord, label = vocab.coord_offset + 7, Vocab.CLASS_OFFSET + 2
    detection = codecs["detection"].grammar()  # [5, V]
    assert detection.shape == (5, vocab.size)
    assert not detection[:, END].any()
    assert detection[:4, coord].all() and not detection[4, coord]
    assert detection[4, label] and not detection[4, Vocab.FAKE_CLASS]  # argmax of real classes
    segmentation = codecs["segmentation"].grammar()[0]
    assert segmentation[[coord, Vocab.SEPARATOR, END]].all() and not segmentation[label]
    keypoints = codecs["keypoints"].grammar()[0]  # the best coordinate replaces INVISIBLE
    assert keypoints[coord] and not keypoints[[Vocab.INVISIBLE, END]].any()
    captioning = codecs["captioning"].grammar()[0]
    assert captioning[[vocab.text_offset, END]].all() and not captioning[coord]


def check_well_formed(prediction, example):
    height, width = example["image"].shape[:2]
    boxes = prediction["boxes"]
    count = len(prediction["labels"])
    assert prediction["image_id"] == int(example["image_id"])
    assert boxes.shape == (count, 4) and prediction["scores"].shape == (count,)
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] >= boxes[:, :2])
    assert np.all((prediction["scores"] >= 0) & (prediction["scores"] <= 1))
    assert len(prediction["masks"]) == count
    for mask in prediction["masks"]:
        assert mask is None or list(mask["size"]) == [height, width]
    assert prediction["keypoints"].shape == (count, 17, 3)
    assert isinstance(prediction["caption"], str)


def test_untrained_model_gives_well_formed_predictions_of_every_task(recipe_and_model):
    config, model = recipe_and_model
    examples = inference.evaluation_examples(config)
    predictions = inference.Predictor(config, model).predict(examples)
    assert len(predictions) == 3
    assert any(p["masks"] and p["masks"][0] is not None for p in predictions)  # boxes prompted
    for prediction, example in zip(predictions, examples, strict=True):
        check_well_formed(prediction, example)


def test_every_decoded_group_is_a_box_even_where_the_model_prefers_fake(recipe_and_model):
    """An untrained model puts most mass on FAKE/END; detection still returns one box per group,
    the most likely real class, scored by its (small) unconstrained probability."""
    from navit_seq.tasks.sequence import sequence_tasks

    config, model = recipe_and_model
    (detection,) = [t.codec for t in sequence_tasks(config.data) if t.name == "detection"]
    predictions = inference.Predictor(config, model).predict(inference.evaluation_examples(config))
    for prediction in predictions:
        assert len(prediction["labels"]) == detection.capacity
        assert (prediction["scores"] < 1).all() and (prediction["scores"] > 0).all()


def test_ground_truth_boxes_prompt_masks_and_person_keypoints(recipe_and_model):
    config, model = recipe_and_model
    config = config.copy_and_resolve_references()
    config.evaluation.use_gt_boxes = True
    examples = inference.evaluation_examples(config)
    predictions = inference.Predictor(config, model).predict(examples)
    for prediction, example in zip(predictions, examples, strict=True):
        check_well_formed(prediction, example)
        labels = example["objects"]["label"]
        np.testing.assert_array_equal(prediction["labels"], labels)
        prompted = min(len(labels), config.evaluation.max_instances)
        assert all(m is not None for m in prediction["masks"][:prompted])
        is_person = labels[:prompted] == 0  # class 0 of the scenes is "person"
        visibility = prediction["keypoints"][:prompted, :, 2]
        assert np.all(visibility[is_person] == 2) and np.all(visibility[~is_person] == 0)


def test_sequence_objective_evaluates_the_split_with_the_contract_metrics(recipe_and_model):
    from navit_seq.train import sequence

    config, model = recipe_and_model
    metrics = sequence.objective(config).evaluate_split(model, 0)
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "keypoints_AP", "caption_BLEU4",
                "caption_CIDEr"):  # fmt: skip
        assert np.isfinite(metrics[key]) and metrics[key] >= 0, key
    assert metrics["num_images"] == 3


@pytest.mark.slow  # ~30-60 s on 2 shared cores: compiles a train step and every decoder call
def test_training_logs_split_metrics_at_eval(scenes_data_dir, tmp_path):
    import json

    from navit_seq.train import loop, sequence

    config = tiny_recipe(scenes_data_dir)
    config.update(num_train_steps=1, eval_every_steps=1, checkpoint_every_steps=1)
    config.data.update(batch_size=8, max_rows_per_seq=4)
    config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    config.evaluation.num_images = 2
    loop.train_and_evaluate(config, tmp_path, sequence.objective(config))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r for r in rows if r["split"] == "eval"]
    assert evaluation["num_images"] == 2 and "loss" in evaluation
    for key in ("bbox_AP", "segm_AP", "keypoints_AP", "caption_BLEU4", "caption_CIDEr"):
        assert key in evaluation


def task_named(predictor, name):
    (task,) = [task for task in predictor.tasks if task.name == name]
    return task


def whole_image_views(examples, prompt_token):
    from navit_seq.tasks.sequence import View

    return [View(e["image"], np.array([[prompt_token]], np.int32)) for e in examples]


def test_detection_scores_are_class_token_probabilities_of_a_full_recomputation(
    recipe_and_model,
):
    """Scores vs the teacher-forced forward pass over the generated rows (float64 softmax of
    the unconstrained logits: FAKE and END keep their mass), not the decoder's cached steps."""
    import jax.numpy as jnp

    from navit_seq.tasks.vocab import END, Vocab

    config, model = recipe_and_model
    predictor = inference.Predictor(config, model)
    examples = inference.evaluation_examples(config)[:2]
    detection = task_named(predictor, "detection")
    codec = detection.codec
    views = whole_image_views(examples, Vocab.DETECTION_PROMPT)
    tokens, probs = predictor.generate(detection, views)  # one call: both images packed
    found = [
        detection.predictions(e, [v], [t], [p], {})
        for e, v, t, p in zip(examples, views, tokens, probs, strict=True)
    ]
    batch = predictor.last_batch
    decoder_input = np.zeros(batch["row_slot"].shape + (codec.seq_len,), np.int32)
    where = {}  # view -> (packed row, decoder row)
    for view, _, b, r in predictor.last_rows:
        row = np.concatenate([[Vocab.DETECTION_PROMPT], tokens[view][0]])
        decoder_input[b, r] = row[: codec.seq_len]
        where[view] = (b, r)
    logits = model({**batch, "decoder_input": jnp.asarray(decoder_input)}, deterministic=True)
    logits = np.asarray(logits["logits"], np.float64)  # [B, R, T, V]
    for image, f in enumerate(found):
        expected = []
        generated = tokens[image][0]
        for group in range(len(generated) // 5):
            if generated[group * 5] == END:
                break
            position = group * 5 + 4  # the class token, predicted from input position + 0
            row_logits = logits[(*where[image], position)]
            probs = np.exp(row_logits - row_logits.max())
            probs /= probs.sum()
            if codec.vocab.is_class(generated[position]):
                expected.append(probs[generated[position]])
        np.testing.assert_allclose(np.sort(f["scores"]), np.sort(expected), rtol=2e-3)
        assert len(f["scores"]) > 0


def test_grammar_masks_are_padded_to_a_wider_decoder_vocabulary():
    from navit_seq.inference import _padded

    grammar = np.array([[True, False], [False, True]])
    padded = _padded(grammar, 5)
    assert padded.shape == (2, 5) and not padded[:, 2:].any()
    np.testing.assert_array_equal(padded[:, :2], grammar)
    assert _padded(grammar, 0).shape == (2, 2)  # unset: the tasks' own width


def test_a_per_task_model_decodes_each_task_with_its_own_tensor(scenes_data_dir):
    """The Predictor's batches carry the task's id (`task_id`), so a per-task refinement
    (model.implicit) reads the right row: changing another task's row changes nothing."""
    import jax.numpy as jnp

    from navit_seq.models.implicit import default_implicit_config
    from navit_seq.train import sequence

    config = tiny_recipe(scenes_data_dir)
    config.model.implicit = default_implicit_config()
    config.model.implicit.update(refinement="multiply", per_task=True)
    model = sequence.model_fn(config)()
    predictor = inference.Predictor(config, model)
    examples = inference.evaluation_examples(config)[:2]
    captioning = task_named(predictor, "captioning")
    views = whole_image_views(examples, captioning.vocab.CAPTION_PROMPT)
    ids = {task.name: task.task_id for task in predictor.tasks}

    def caption_probs():
        return np.stack([p[0] for p in predictor.generate(captioning, views)[1]])  # greedy

    before = caption_probs()
    batch = predictor.last_batch
    valid = np.asarray(batch["example_valid"])  # the images' slots (empty slots read none)
    assert (np.asarray(batch["task_id"])[valid] == ids["captioning"]).all()
    table = model.decoder.implicit_refinement.vector
    rows = np.array(table[...])
    rows[ids["detection"]] += 1.0
    table[...] = jnp.asarray(rows)
    np.testing.assert_array_equal(caption_probs(), before)
    rows[ids["captioning"]] += 1.0
    table[...] = jnp.asarray(rows)
    assert not np.allclose(caption_probs(), before)


def test_images_packed_several_per_row_decode_as_each_image_alone(scenes_data_dir):
    """Packing (three images in one packed row, their rows in one decoder call) changes no
    greedy output: each row reads only its own image (architecture.md §9)."""
    from navit_seq.tasks.vocab import Vocab
    from navit_seq.train import sequence

    config = tiny_recipe(scenes_data_dir)
    config.data.seq_len = 3 * config.data.eval_max_tokens  # room for three images per row
    model = sequence.model_fn(config)()
    predictor = inference.Predictor(config, model)
    examples = inference.evaluation_examples(config)
    captioning = task_named(predictor, "captioning")  # greedy
    views = whole_image_views(examples, Vocab.CAPTION_PROMPT)
    packed_tokens, packed_probs = predictor.generate(captioning, views)
    assert len({b for _, _, b, _ in predictor.last_rows}) == 1  # all three in one packed row
    assert sorted(np.asarray(predictor.last_batch["example_valid"]).sum(axis=1))[-1] == 3
    for view, tokens, probs in zip(views, packed_tokens, packed_probs, strict=True):
        alone_tokens, alone_probs = predictor.generate(captioning, [view])
        np.testing.assert_array_equal(tokens, alone_tokens[0])
        np.testing.assert_allclose(probs, alone_probs[0], rtol=1e-4, atol=1e-6)
