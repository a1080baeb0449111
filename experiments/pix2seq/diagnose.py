"""Does a Pix2Seq recipe read its images? Short in-process training + three measurements.

    python experiments/pix2seq/diagnose.py --config configs/pix2seq_scenes.py:steps=300 \
        [--config.data.tasks="(('detection',1.0),)"] [--eval_batches 8] [--ap_images 100] \
        [--workdir DIR]

After `num_train_steps` steps (no checkpoints; or, with --workdir, from DIR's latest
checkpoint without training) it measures, on the evaluation split:
- the teacher-forced token loss with the real images, with every patch set to mid-grey and with
  each packed row's pixels taken from the next row (positions, sizes and packing kept; the
  shuffled pixels belong to other images): equal losses mean the decoder ignores the pixels;
- for detection rows, the same two losses per object slot and field (ymin, xmin, ymax, xmax,
  class of the 1st, 2nd, ... object): which parts of a box the model reads from the image;
- the gradient norm reaching each part (encoder, memory, decoder) on one train batch;
- bbox AP / AP50 of `config.evaluation` on the first `ap_images` validation images.
Prints one JSON line last.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import flags  # noqa: E402
from etils import epath  # noqa: E402
from flax import nnx  # noqa: E402

from navit_seq import config_utils, cpu_runtime  # noqa: E402
from navit_seq import main as main_lib  # noqa: E402
from navit_seq.train import checkpoint as checkpoint_lib  # noqa: E402
from navit_seq.train import loop, sequence  # noqa: E402

EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "evaluation batches for the losses")
AP_IMAGES = flags.DEFINE_integer("ap_images", 100, "validation images scored for AP (0: skip)")
MID_GREY = 128  # uint8 pixel that the model maps to ~0 ((x / 127.5) - 1)
FIELDS = ("ymin", "xmin", "ymax", "xmax", "class")  # a detection object's 5 tokens
SLOTS = 3  # first objects of a row broken down per field


def grey_patches(batch: dict) -> dict:
    return {**batch, "patches": np.full_like(batch["patches"], MID_GREY)}


def shuffled_patches(batch: dict) -> dict:
    """Row b's patches replaced by row b-1's: real pixels that belong to other images."""
    return {**batch, "patches": np.roll(batch["patches"], 1, axis=0)}


def _eval_loss(trainer, state, batches, transform) -> dict[str, float]:
    metrics = trainer.evaluate(state, [transform(b) for b in batches])
    return {k: round(v, 4) for k, v in metrics.items() if k.startswith("loss")}


def first_eval_batches(objective, num_batches: int) -> list[dict]:
    batches, iterator = [], iter(objective.eval_iterator())
    try:
        for _ in range(num_batches):
            batches.append(next(iterator))
    except StopIteration:
        pass
    finally:
        loop.close_iterator(iterator)
    return batches


def field_losses(trainer, state, batches, transform, detection_id) -> dict[str, float]:
    """Mean token loss per (object slot, field) of the detection rows (response token t is
    object t // 5, field t % 5: the prompt is one token), and over all later objects."""
    model = nnx.merge(trainer.graphdef, state.params, state.model_state)
    sums, counts = {}, {}
    for batch in batches:
        batch = transform(batch)
        with trainer.context():
            logits = model(trainer.global_batch(batch), deterministic=True)["logits"]
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))  # [B, R, T, V]
        targets, weights = batch["decoder_target"], batch["decoder_weights"]
        ce = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, R, T]
        slot_task = np.take_along_axis(
            batch["task_id"], np.maximum(batch["row_slot"], 0), axis=1
        )  # [B, R]
        rows = (slot_task == detection_id) & (batch["row_slot"] >= 0)
        for position in range(targets.shape[-1]):
            keep = rows & (weights[..., position] == 1.0)
            if not keep.any():
                continue
            slot, field = divmod(position, len(FIELDS))
            name = f"{'obj' + str(slot + 1) if slot < SLOTS else 'later'}/{FIELDS[field]}"
            sums[name] = sums.get(name, 0.0) + float(ce[..., position][keep].sum())
            counts[name] = counts.get(name, 0) + int(keep.sum())
    return {name: round(sums[name] / counts[name], 3) for name in sums}


def _grad_norms(trainer, state, objective, batch) -> dict[str, float]:
    """Gradient norm of the token loss per top-level part (encoder, memory, decoder)."""
    model = nnx.merge(trainer.graphdef, state.params, state.model_state)

    def loss_fn(model):
        loss_sum, weight_sum, _ = objective.loss(model, batch, True)
        return loss_sum / weight_sum

    with trainer.context():
        grads = nnx.state(nnx.grad(loss_fn)(model))
    return {part: float(optax.global_norm(grads[part])) for part in grads}


def train_in_process(trainer, objective, config) -> tuple[object, list, dict]:
    """(state, loss history, gradient norms on the last batch) after num_train_steps steps."""
    state = trainer.init_state()
    train_iter = objective.train_iterator()
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
    return state, history, grads


def _restore(trainer, workdir: str) -> tuple[int, object]:
    checkpointer = checkpoint_lib.Checkpointer(epath.Path(workdir) / "checkpoints", every_steps=0)
    try:
        return checkpointer.restore_state(None, trainer.abstract_state)
    finally:
        checkpointer.close()


def diagnose(config, eval_batches: int, ap_images: int, workdir: str = "") -> dict:
    """Trains `config.num_train_steps` steps in this process (or restores `workdir`'s latest
    checkpoint), then measures (module docstring)."""
    objective = main_lib.objective_for(config)
    trainer = loop.Trainer(config, objective)
    started = time.perf_counter()
    if workdir:
        step, state = _restore(trainer, workdir)
        result = {"workdir": workdir, "steps": step}
    else:
        state, history, grads = train_in_process(trainer, objective, config)
        step = config.num_train_steps
        result = {
            "steps": step,
            "train_seconds": round(time.perf_counter() - started, 1),
            "train_loss_history": history,
            "grad_norm": grads,
        }
    batches = first_eval_batches(objective, eval_batches)
    result["eval_loss_real_images"] = _eval_loss(trainer, state, batches, lambda b: b)
    result["eval_loss_grey_images"] = _eval_loss(trainer, state, batches, grey_patches)
    result["eval_loss_shuffled_images"] = _eval_loss(trainer, state, batches, shuffled_patches)
    ids = sequence.task_ids(config)
    if "detection" in ids:
        real = field_losses(trainer, state, batches, lambda b: b, ids["detection"])
        grey = field_losses(trainer, state, batches, grey_patches, ids["detection"])
        result["detection_field_loss_real_vs_grey"] = {k: (real[k], grey[k]) for k in real}
    if ap_images and objective.evaluate_split is not None:
        config = config.copy_and_resolve_references()
        config.evaluation.num_images = ap_images
        started = time.perf_counter()
        model = nnx.merge(trainer.graphdef, state.params, state.model_state)
        with trainer.context():
            split = main_lib.objective_for(config).evaluate_split(model, step)
        result["eval_seconds"] = round(time.perf_counter() - started, 1)
        result["split_metrics"] = {k: round(float(v), 4) for k, v in split.items()}
    return result


def main(argv):
    del argv
    config = config_utils.validated_config()
    cpu_runtime.prepare_process_for_training()
    workdir = flags.FLAGS.workdir or ""  # config_utils' --workdir: diagnose a trained run
    print(json.dumps(diagnose(config, EVAL_BATCHES.value, AP_IMAGES.value, workdir)))


if __name__ == "__main__":
    config_utils.run(main)
