"""The training loop shared by every objective: sharded jitted step, checkpoints, metrics, eval.

An objective (e.g. `navit_seq.train.classification`) supplies the model, its loss and eval
metrics, and the data iterators; this loop knows nothing about tasks.
"""

import dataclasses
import gc
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from clu import periodic_actions
from flax import nnx

from navit_seq import cli, cpu_runtime, sharding
from navit_seq.train import checkpoint as checkpoint_lib
from navit_seq.train import metrics as metrics_lib
from navit_seq.train import optimizer as optimizer_lib
from navit_seq.train import state as state_lib

Batch = Mapping[str, Any]
MetricDict = dict[str, clu_metrics.Metric]  # clu metrics; merge() accumulates exactly
# loss(model, batch, deterministic) -> (summed loss, summed weight, metrics). Returning sums lets
# gradient accumulation give exactly the full-batch gradient: grad(sum) / total weight.
LossFn = Callable[[nnx.Module, Batch, bool], tuple[jax.Array, jax.Array, MetricDict]]
# The packed image batch (docs/architecture.md §3) that every NaViT-based objective's encoder
# reads; the step's own metrics read `segment_ids` and `example_valid` (STEP_KEYS).
IMAGE_KEYS = ("patches", "segment_ids", "patch_coords", "image_grid", "example_valid")
STEP_KEYS = ("segment_ids", "example_valid")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a per-objective trainer module provides to the shared loop."""

    # The batch keys its loss and eval metrics read: only these go to devices (`model_inputs`);
    # host-only fields such as `example_id`, `original_size` or `crop_box` stay behind.
    batch_keys: tuple[str, ...]
    model_fn: Callable[[], nnx.Module]  # builds the model (called under the mesh)
    loss: LossFn
    eval_metrics: Callable[[nnx.Module, Batch], MetricDict]
    train_iterator: Callable[[], Iterator[Batch]]  # checkpointable grain iterator, this host
    eval_iterator: Callable[[], Iterable[Batch]]  # a fresh finite pass, this host
    # Optional whole-split task metrics (model, step) -> scalars (e.g. COCO AP, caption CIDEr),
    # added to the eval metrics at the evals due by `config.evaluation.every_steps`.
    evaluate_split: Callable[[nnx.Module, int], dict[str, float]] | None = None


def merge_metrics(total: MetricDict | None, new: MetricDict) -> MetricDict:
    if total is None:
        return new
    return {name: total[name].merge(metric) for name, metric in new.items()}


def host_metrics(metrics: MetricDict) -> MetricDict:
    """Waits for a step's metrics and moves them to numpy; the host then merges them in numpy.

    Why not merge on device: the main thread dispatching JAX ops while a step that runs a host
    callback (the learned tables' index check, models/index_check.py) is in flight is the
    pattern behind JAX CPU-client deadlocks (jax-ml/jax#25861); waiting per step rules it out
    and costs little, since the grain pipeline prefetches anyway.
    """
    return jax.device_get(metrics)


def compute_metrics(metrics: MetricDict) -> dict[str, float]:
    """Final scalar values (host floats) of accumulated clu metrics. A metric whose `compute`
    returns None measured nothing in this window (e.g. a task no batch held) and is left out,
    so curves have gaps where there was no data instead of false zeros."""
    values = {name: m.compute() for name, m in metrics.items()}
    return metrics_lib.to_scalars({name: v for name, v in values.items() if v is not None})


def model_inputs(batch: Batch, keys: Iterable[str], *, reader: str = "the step") -> dict[str, Any]:
    """The entries `keys` of a pipeline batch: what goes to devices (the rest stays on the host).

    A missing key is a ValueError naming it and `reader` (e.g. the objective that declared it).
    """
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(
            f"{reader} reads batch keys {missing}, which the batch lacks (it has "
            f"{sorted(batch)}); fix the objective's batch_keys or the pipeline's task."
        )
    return {key: batch[key] for key in keys}


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, ...] -> [num_micro, B / num_micro, ...], micro-batch i = rows i, i+k, i+2k, ...

    Strided, so every data shard contributes equally to every micro-batch.
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int,
    ema_decay: float,
) -> Callable[[state_lib.TrainState, Batch], tuple[state_lib.TrainState, MetricDict]]:
    """The pure train step: loss, gradients (optionally accumulated), update, EMA, metrics."""

    def loss_and_grads(params, model_state, batch):
        def objective(params, model_state):
            # Fresh Variables at this trace level, so the model may update its RNG counters.
            model_state = jax.tree.map(lambda x: x, model_state)
            model = nnx.merge(graphdef, params, model_state)
            loss_sum, weight_sum, metrics = loss_fn(model, batch, False)
            new_model_state = nnx.split(model, nnx.Param, ...)[2]
            return loss_sum, (weight_sum, metrics, new_model_state)

        return jax.grad(objective, has_aux=True)(params, model_state)

    def train_step(state: state_lib.TrainState, batch: Batch):
        if grad_accum_steps == 1:
            grads, (weight_sum, metrics, model_state) = loss_and_grads(
                state.params, state.model_state, batch
            )
        else:
            micro = _split_micro_batches(batch, grad_accum_steps)

            def accumulate(carry, micro_batch):
                grad_sum, weight_total, model_state, metric_total = carry
                grads, (weight, metrics, model_state) = loss_and_grads(
                    state.params, model_state, micro_batch
                )
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                metric_total = merge_metrics(metric_total, metrics)
                return (grad_sum, weight_total + weight, model_state, metric_total), None

            first = jax.tree.map(lambda x: x[0], micro)
            metric_shapes = jax.eval_shape(
                lambda: loss_and_grads(state.params, state.model_state, first)[1][1]
            )
            zero_metrics = jax.tree.map(jnp.zeros_like, metric_shapes)  # empty Averages
            zero_grads = jax.tree.map(jnp.zeros_like, state.params)
            carry = (zero_grads, jnp.zeros((), jnp.float32), state.model_state, zero_metrics)
            (grads, weight_sum, model_state, metrics), _ = jax.lax.scan(accumulate, carry, micro)
        # Mean over the batch's loss weights (valid examples / weighted tokens); never / 0.
        grads = jax.tree.map(lambda g: g / jnp.maximum(weight_sum, 1e-9), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = jax.tree.map(
                lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema_params, params
            )
        segment_ids = batch["segment_ids"]  # [B, L]
        metrics = dict(metrics)
        metrics.update(
            # asarray: optax's constant schedule returns a Python float
            learning_rate=clu_metrics.LastValue.from_model_output(
                jnp.asarray(schedule(state.step))
            ),
            grad_norm=clu_metrics.Average.from_model_output(optax.global_norm(grads)),
            param_norm=clu_metrics.LastValue.from_model_output(optax.global_norm(params)),
            padding_fraction=clu_metrics.Average.from_model_output(
                (segment_ids == 0).astype(jnp.float32)
            ),
            tokens_per_step=clu_metrics.Average.from_model_output(
                jnp.sum(segment_ids > 0).astype(jnp.float32)
            ),
            images_per_step=clu_metrics.Average.from_model_output(
                jnp.sum(batch["example_valid"]).astype(jnp.float32)
            ),
        )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            ema_params=ema_params,
        )
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, eval_metrics: Callable, use_ema: bool) -> Callable:
    """Metrics of one eval batch (EMA parameters when the recipe keeps them)."""

    def eval_step(state: state_lib.TrainState, batch: Batch) -> MetricDict:
        params = state.ema_params if use_ema else state.params
        model = nnx.merge(graphdef, params, state.model_state)
        return eval_metrics(model, batch)

    return eval_step


@dataclasses.dataclass
class Trainer:
    """Mesh, sharded state and compiled steps for one config; used by main/evaluate/tests."""

    config: ml_collections.ConfigDict
    objective: Objective

    def __post_init__(self):
        config = self.config
        missing = [key for key in STEP_KEYS if key not in self.objective.batch_keys]
        if missing:
            raise ValueError(
                f"objective {config.trainer!r}: batch_keys {self.objective.batch_keys} lack "
                f"{missing}, which the train step's own metrics read; add them."
            )
        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = sharding.logical_rules(config.mesh)
        self.tx, self.schedule = optimizer_lib.make_optimizer(config.optimizer)
        self.use_ema = bool(config.optimizer.ema_decay)
        self.graphdef = state_lib.model_shell(self.objective.model_fn, self.mesh, self.rules)
        self.abstract_state, self.state_shardings = state_lib.abstract_train_state(
            self.objective.model_fn, self.tx, self.mesh, self.rules, self.use_ema
        )
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        num_shards = sharding.batch_axis_size(self.mesh, self.rules)
        accum = config.optimizer.grad_accum_steps
        if config.data.batch_size % (num_shards * accum):
            raise ValueError(
                f"config.data.batch_size={config.data.batch_size} must be divisible by the batch "
                f"shards ({num_shards}, from config.mesh) times "
                f"config.optimizer.grad_accum_steps ({accum})."
            )
        replicated = state_lib.replicated(self.mesh)
        step = make_train_step(
            self.graphdef,
            self.objective.loss,
            self.tx,
            self.schedule,
            accum,
            float(config.optimizer.ema_decay),
        )
        self._train_step = jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
            compiler_options=cpu_runtime.compiler_options(),
        )
        self._eval_step = jax.jit(
            make_eval_step(self.graphdef, self.objective.eval_metrics, self.use_ema),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=replicated,
            compiler_options=cpu_runtime.compiler_options(),
        )
        self._compiled_train_step = None

    def context(self):
        """Mesh + logical rules, so model-internal activation annotations resolve."""
        return _MeshContext(self.mesh, self.rules)

    def init_state(self) -> state_lib.TrainState:
        with self.context():
            return state_lib.create_train_state(
                self.objective.model_fn, self.tx, self.mesh, self.rules, self.use_ema
            )[1]

    def global_batch(self, local_batch: Batch) -> dict[str, jax.Array]:
        """The objective's batch keys of this host's batch, as global sharded arrays."""
        inputs = model_inputs(
            local_batch, self.objective.batch_keys, reader=f"objective {self.config.trainer!r}"
        )
        return sharding.global_batch(inputs, self.batch_sharding)

    def compiled_train_step(
        self, state: state_lib.TrainState, batch: dict[str, jax.Array]
    ) -> jax.stages.Compiled:
        """The train step compiled for these shapes: on first call, with its memory use printed
        (benchmarks time and cost-analyse this very executable)."""
        if self._compiled_train_step is None:
            with self.context():
                compiled = self._train_step.lower(state, batch).compile()
            log_memory_analysis(compiled)
            self._compiled_train_step = compiled
        return self._compiled_train_step

    def train_step(self, state: state_lib.TrainState, batch: dict[str, jax.Array]):
        """Runs the compiled step; compiles (and prints memory use) on first call."""
        with self.context():
            return self.compiled_train_step(state, batch)(state, batch)

    def evaluate(self, state: state_lib.TrainState, batches: Iterable[Batch]) -> dict[str, float]:
        """Metrics of one pass over `batches` (the eval iterator is closed afterwards)."""
        total = None
        iterator = iter(batches)
        progress = cli.Progress("eval", unit="batches")
        try:
            with self.context():
                for count, local_batch in enumerate(iterator, 1):
                    batch = self.global_batch(local_batch)
                    total = merge_metrics(total, host_metrics(self._eval_step(state, batch)))
                    progress.update(count)
        finally:
            close_iterator(iterator)
        progress.close()
        if total is None:
            raise ValueError("The evaluation split yielded no batches; check config.data.")
        return compute_metrics(total)

    def split_metrics(self, state: state_lib.TrainState, step: int) -> dict[str, float]:
        """The objective's whole-split metrics of the eval model (EMA parameters if kept)."""
        params = state.ema_params if self.use_ema else state.params
        with self.context():
            return self.objective.evaluate_split(
                nnx.merge(self.graphdef, params, state.model_state), step
            )


def split_eval_every_steps(config: ml_collections.ConfigDict) -> int:
    """`config.evaluation.every_steps`: 0 (or no `evaluation`) = at every eval, < 0 = never."""
    every = (config.get("evaluation") or {}).get("every_steps", 0)
    return config.eval_every_steps if every == 0 else max(every, 0)


def close_iterator(iterator: Any) -> None:
    """Stops a grain iterator's worker processes now rather than at interpreter exit.

    Then collects reference cycles: batches that came through worker shared memory are freed
    only when their last reference goes, and one still held in a cycle at exit makes
    multiprocessing's resource tracker warn of "leaked shared_memory objects". (Since this
    collect the warning has not been seen in the diagnose runs; no controlled test.)
    """
    if hasattr(iterator, "close"):
        iterator.close()
    gc.collect()


class _MeshContext:
    def __init__(self, mesh, rules):
        self._contexts = [jax.set_mesh(mesh), nnx.logical_axis_rules(rules)]

    def __enter__(self):
        for context in self._contexts:
            context.__enter__()

    def __exit__(self, *exc):
        for context in reversed(self._contexts):
            context.__exit__(*exc)


def log_memory_analysis(compiled: Any) -> None:
    """Prints the compiled step's memory use before step 1 (per device, as XLA reports it)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        print("train step memory analysis: not available on this backend", flush=True)
        return
    fields = ("argument", "output", "temp", "alias", "generated_code")
    sizes = {
        f: getattr(analysis, f"{f}_size_in_bytes", None)
        for f in fields
        if getattr(analysis, f"{f}_size_in_bytes", None) is not None
    }
    text = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items())
    print(f"train step memory analysis (per device): {text}", flush=True)


def initialized_from(trainer: Trainer, workdir: str | Path) -> state_lib.TrainState:
    """A fresh train state (step 0, new optimizer state) whose parameters and model state are
    those of `workdir`'s latest checkpoint: the next stage of staged training, or fine-tuning.
    The two recipes must build the same model (same parameter shapes)."""
    source = checkpoint_lib.Checkpointer(Path(workdir) / "checkpoints", every_steps=0)
    try:
        step, restored = source.restore_state(None, trainer.abstract_state)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"config.init_from={str(workdir)!r}: {error} Or set init_from='' to start from scratch."
        ) from None
    finally:
        source.close()
    fresh = trainer.init_state()
    ema = restored.params if fresh.ema_params is not None else None
    state = fresh.replace(params=restored.params, model_state=restored.model_state, ema_params=ema)
    print(f"Initialised from {source.path(step)} (step {step}); training starts at step 0.",
          flush=True)  # fmt: skip
    return state


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, objective: Objective
) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns last metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, objective)
    logger = metrics_lib.MetricsLogger(workdir)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir / "checkpoints",
        every_steps=config.checkpoint_every_steps,
        keep=config.get("keep_checkpoints", 3),
        keep_every_steps=config.get("keep_checkpoint_every_steps"),
    )
    train_iter = objective.train_iterator()
    restored = checkpointer.restore_latest(trainer.abstract_state, train_iter)
    if restored is None and config.get("init_from"):
        start_step, state = 0, initialized_from(trainer, config.init_from)
    elif restored is None:
        start_step, state = 0, trainer.init_state()
        logging.info("No checkpoint in %s: starting from scratch.", checkpointer.directory)
    else:
        start_step, state = restored
        print(f"Resumed from {checkpointer.path(start_step)} (step {start_step}).", flush=True)
    logger.truncate_after(start_step)
    preemption = checkpoint_lib.PreemptionFlag().install()
    num_steps = config.num_train_steps
    progress = cli.Progress("train", total=num_steps, unit="steps")
    hooks = []
    if config.get("profile_steps", 0) and jax.process_index() == 0:
        hooks.append(
            periodic_actions.Profile(
                logdir=str(workdir), num_profile_steps=config.profile_steps, first_profile=10
            )
        )
    last_saved = start_step if restored else None
    # Rates are timed from the end of the first step, so compilation never counts.
    window, window_start, timed_steps = None, time.perf_counter(), 0
    last_scalars: dict[str, float] = {}
    step = start_step
    try:
        while step < num_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                local_batch = next(train_iter)
                batch = trainer.global_batch(local_batch)
                state, step_metrics = trainer.train_step(state, batch)
            step += 1
            window = merge_metrics(window, host_metrics(step_metrics))
            if step == start_step + 1:
                window_start = time.perf_counter()
            else:
                timed_steps += 1
            progress.update(step)
            for hook in hooks:
                hook(step)
            if is_due(step, config.log_every_steps, num_steps):
                elapsed = time.perf_counter() - window_start
                scalars = compute_metrics(window)
                if config.get("log_batch_fingerprint", False):
                    scalars["batch_fingerprint"] = batch_fingerprint(
                        local_batch, objective.batch_keys
                    )
                last_good = checkpointer.path(last_saved) if last_saved is not None else None
                last_scalars = _log_train(logger, step, scalars, elapsed, timed_steps, last_good)
                window, window_start, timed_steps = None, time.perf_counter(), 0
            stopping = preemption.is_set()
            if checkpointer.should_save(step) or stopping or step == num_steps:
                _check_state_finite(state, step, last_saved, checkpointer)
                checkpointer.save(step, state, train_iter, force=True)
                last_saved = step
            if stopping:
                print(f"Preempted: saved {checkpointer.path(step)}; exiting.", flush=True)
                break
            if is_due(step, config.eval_every_steps, num_steps):
                eval_started = time.perf_counter()
                eval_scalars = trainer.evaluate(state, objective.eval_iterator())
                if objective.evaluate_split is not None and is_due(
                    step, split_eval_every_steps(config), num_steps
                ):
                    eval_scalars.update(trainer.split_metrics(state, step))
                logger.write(step, "eval", eval_scalars)
                print(f"step {step} eval: {_fmt(eval_scalars)}", flush=True)
                window_start += time.perf_counter() - eval_started  # rates count training only
        progress.close()
    finally:
        close_iterator(train_iter)
        checkpointer.close()  # waits for the last asynchronous save
        logger.flush()
        preemption.uninstall()
    return last_scalars


def is_due(step: int, every_steps: int, last_step: int) -> bool:
    """A periodic action runs every `every_steps` steps (0 = never) and at the last step."""
    return every_steps > 0 and (step % every_steps == 0 or step == last_step)


def batch_fingerprint(batch: Batch, keys: Iterable[str]) -> float:
    """CRC32 of this host's batch arrays `keys` (what the step reads): lets tests and users
    check two runs saw one stream."""
    crc = 0
    for leaf in jax.tree.leaves(model_inputs(batch, keys)):
        crc = zlib.crc32(np.ascontiguousarray(leaf).tobytes(), crc)
    return float(crc)


def _log_train(logger, step, scalars, elapsed, timed_steps, last_good) -> dict[str, float]:
    if timed_steps:
        scalars["step_time_s"] = elapsed / timed_steps
        scalars["images_per_s"] = scalars["images_per_step"] * timed_steps / elapsed
        scalars["tokens_per_s"] = scalars["tokens_per_step"] * timed_steps / elapsed
    metrics_lib.check_finite(step, scalars, last_good)
    logger.write(step, "train", scalars)
    print(f"step {step} train: {_fmt(scalars)}", flush=True)
    return scalars


def _check_state_finite(state, step, last_saved, checkpointer) -> None:
    """Never overwrite good checkpoints with NaN parameters."""
    finite = jax.tree.reduce(
        lambda ok, x: ok & jnp.all(jnp.isfinite(x)), state.params, jnp.array(True)
    )
    if not bool(finite):
        last = checkpointer.path(last_saved) if last_saved is not None else None
        metrics_lib.check_finite(step, {"params": float("nan")}, last)


def _fmt(scalars: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))
