"""Does a Pix2Seq recipe read its images? Short in-process training + three measurements.

    python experiments/pix2seq/diagnose.py --config configs/pix2seq_scenes.py:steps=300 \
        [--config.data.tasks="(('detection',1.0),)"] [--eval_batches 8] [--ap_images 100]

After `num_train_steps` steps (no checkpoints) it measures, on the evaluation split:
- the teacher-forced token loss with the real images and with every patch set to mid-grey
  (positions, sizes and packing kept): equal losses mean the decoder ignores the pixels;
- the gradient norm reaching each part (encoder, memory, decoder) on one train batch;
- bbox AP / AP50 of `config.evaluation` on the first `ap_images` validation images.
Prints one JSON line last.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from navit_seq import config_utils, cpu_runtime  # noqa: E402
from navit_seq import main as main_lib
from navit_seq.train import loop  # noqa: E402

EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "evaluation batches for the losses")
AP_IMAGES = flags.DEFINE_integer("ap_images", 100, "validation images scored for AP (0: skip)")
MID_GREY = 128  # uint8 pixel that the model maps to ~0 ((x / 127.5) - 1)


def _blank(batch: dict) -> dict:
    return {**batch, "patches": np.full_like(batch["patches"], MID_GREY)}


def _eval_loss(trainer, state, objective, num_batches, transform) -> dict[str, float]:
    batches = []
    iterator = iter(objective.eval_iterator())
    try:
        for _ in range(num_batches):
            batches.append(transform(next(iterator)))
    except StopIteration:
        pass
    finally:
        loop.close_iterator(iterator)
    metrics = trainer.evaluate(state, batches)
    return {k: round(v, 4) for k, v in metrics.items() if k.startswith("loss")}


def _grad_norms(trainer, state, objective, batch) -> dict[str, float]:
    """Gradient norm of the token loss per top-level part (encoder, memory, decoder)."""
    model = nnx.merge(trainer.graphdef, state.params, state.model_state)

    def loss_fn(model):
        loss_sum, weight_sum, _ = objective.loss(model, batch, True)
        return loss_sum / weight_sum

    with trainer.context():
        grads = nnx.state(nnx.grad(loss_fn)(model))
    return {part: float(optax.global_norm(grads[part])) for part in grads}


def diagnose(config, eval_batches: int, ap_images: int) -> dict:
    """Trains `config.num_train_steps` steps in this process, then measures (module docstring)."""
    objective = main_lib.objective_for(config)
    trainer = loop.Trainer(config, objective)
    state = trainer.init_state()
    train_iter = objective.train_iterator()
    started = time.perf_counter()
    history = []
    try:
        for step in range(1, config.num_train_steps + 1):
            batch = trainer.global_batch(next(train_iter))
            state, metrics = trainer.train_step(state, batch)
            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                scalars = loop.compute_metrics(loop.host_metrics(metrics))
                history.append((step, round(scalars["loss"], 4)))
                print(f"step {step} loss {scalars['loss']:.4f}", flush=True)
        grads = _grad_norms(trainer, state, objective, batch)
    finally:
        loop.close_iterator(train_iter)
    result = {
        "steps": config.num_train_steps,
        "train_seconds": round(time.perf_counter() - started, 1),
        "train_loss_history": history,
        "eval_loss_real_images": _eval_loss(trainer, state, objective, eval_batches, lambda b: b),
        "eval_loss_grey_images": _eval_loss(trainer, state, objective, eval_batches, _blank),
        "grad_norm": grads,
    }
    if ap_images and objective.evaluate_split is not None:
        config = config.copy_and_resolve_references()
        config.evaluation.num_images = ap_images
        started = time.perf_counter()
        model = nnx.merge(trainer.graphdef, state.params, state.model_state)
        with trainer.context():
            split = main_lib.objective_for(config).evaluate_split(model, config.num_train_steps)
        result["eval_seconds"] = round(time.perf_counter() - started, 1)
        result["split_metrics"] = {k: round(float(v), 4) for k, v in split.items()}
    return result


def main(argv):
    del argv
    config = config_utils.validated_config()
    cpu_runtime.prepare_process_for_training()
    print(json.dumps(diagnose(config, EVAL_BATCHES.value, AP_IMAGES.value)))


if __name__ == "__main__":
    config_utils.run(main)
