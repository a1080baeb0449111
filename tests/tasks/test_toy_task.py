"""A new task needs nothing outside `tasks/` and a recipe: a toy task defined here, through
`tasks.register` and the `SequenceTask` protocol, trains a step, is predicted by the
task-agnostic inference driver and scored by a metric family registered next to it."""

import dataclasses
import json
from typing import ClassVar

import numpy as np
import pytest

from navit_seq import inference, tasks
from navit_seq.evaluation import metrics
from navit_seq.tasks.sequence import CodecTask, DecodeSettings, View, vocab_from_config
from navit_seq.tasks.vocab import Vocab, build_row, response_until_end, stack_rows

COUNT_PROMPT = 14  # a prompt id no built-in task uses (tasks/vocab.py: 10..13)


@dataclasses.dataclass(frozen=True)
class CountCodec:
    """[count] then the number of objects as one coordinate token (bin n) then END."""

    vocab: Vocab
    seq_len: int

    PROMPT_LENGTH: ClassVar[int] = 1

    def grammar(self) -> np.ndarray:
        return self.vocab.is_coord(np.arange(self.vocab.size))[None]  # [1, V]

    def encode(self, example, *, training, rng):
        del training, rng
        count = min(len(example["objects"]["label"]), self.vocab.num_bins - 1)
        prompt = np.array([COUNT_PROMPT], np.int32)
        response = np.array([self.vocab.coord_offset + count], np.int32)
        row = build_row(prompt, response, np.ones(1, np.float32), self.seq_len, 0.1)
        return stack_rows([(prompt, *row)], self.seq_len, 1), {"examples": 1}

    def decode(self, tokens: np.ndarray) -> int:
        tokens = response_until_end(tokens)
        return int(tokens[0] - self.vocab.coord_offset) if len(tokens) else -1


def has_objects(example) -> bool:
    return len(example["objects"]["label"]) > 0


@dataclasses.dataclass(frozen=True)
class ObjectCount(CodecTask):
    name: ClassVar[str] = "object_count"
    task_id: ClassVar[int] = 6  # after the built-in ids (tasks.NUM_TASK_IDS)
    annotations: ClassVar[tasks.Annotations] = tasks.Annotations("object labels", has_objects)
    metric: ClassVar[str] = "count_accuracy"

    def decode_settings(self, options) -> DecodeSettings:
        return DecodeSettings(max_len=1)  # greedy, one token

    def prompts(self, example, image, given, options) -> list[View]:
        return [View(image, np.array([[COUNT_PROMPT]], np.int32))]

    def predictions(self, example, views, tokens, probs, given) -> dict:
        return {"object_count": self.codec.decode(tokens[0][0])}


def count_accuracy(examples, predictions, class_names) -> dict[str, float]:
    right = [
        p["object_count"] == len(e["objects"]["label"])
        for e, p in zip(examples, predictions, strict=True)
    ]
    return {"count_accuracy": float(np.mean(right))}


@tasks.register("object_count")
def object_count(config) -> ObjectCount:
    return ObjectCount(CountCodec(vocab_from_config(config), int(config.seq_len)))


metrics.register_metric("count_accuracy", count_accuracy)


@pytest.fixture
def recipe(scenes_data_dir):
    from test_inference import tiny_recipe

    config = tiny_recipe(scenes_data_dir)
    config.data.tasks = (("object_count", 1.0),)
    config.data.task = {"name": "object_count", "seq_len": 8}
    config.model.decoder.max_len = 8
    config.data.update(batch_size=4, max_rows_per_seq=4)
    config.update(num_train_steps=1, eval_every_steps=1, checkpoint_every_steps=1)
    config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    config.evaluation.num_images = 3
    return config


def test_a_toy_task_defined_in_the_test_trains_predicts_and_is_scored(recipe, tmp_path):
    from navit_seq.train import loop, sequence

    objective = sequence.objective(recipe)
    loop.train_and_evaluate(recipe, tmp_path, objective)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (train,) = [r for r in rows if r["split"] == "train"]
    (evaluation,) = [r for r in rows if r["split"] == "eval"]
    assert np.isfinite(train["loss/object_count"])
    assert 0 <= evaluation["count_accuracy"] <= 1 and evaluation["num_images"] == 3
    assert "bbox_AP" not in evaluation  # only the recipe's metric families are scored

    model = objective.model_fn()
    (prediction,) = inference.Predictor(recipe, model).predict(
        inference.evaluation_examples(recipe)[:1]
    )
    assert set(prediction) == {"image_id", "object_count"}
    assert 0 <= prediction["object_count"] < recipe.data.task.get("num_bins", 1000)
