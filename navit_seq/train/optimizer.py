"""Optimizer from `config.optimizer`: optax AdamW, LR schedules, regex parameter groups.

Parameter groups: `weight_decay` is a sequence of `(regex, decay)` pairs and `frozen` a sequence
of regexes, matched (first match wins, `re.fullmatch`) against parameter paths such as
`encoder/blocks/0/mlp/fc1/kernel`. Frozen parameters get zero updates and no optimizer state.
Weight decay follows optax.adamw (decoupled, multiplied by the current learning rate).
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from navit_seq.sharding import path_str

FROZEN = "frozen"


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup, then `schedule.kind` in {constant, cosine, linear, rsqrt}.

    rsqrt (NaViT's choice): lr / sqrt(1 + (step - warmup) / timescale), with an optional linear
    cooldown to 0 over the last `cooldown_steps` steps (as in big_vision).
    """
    sched = config.schedule
    peak, warmup, total = config.learning_rate, sched.warmup_steps, sched.decay_steps
    warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
    kind = sched.kind
    if kind == "constant":
        decay_fn = optax.constant_schedule(peak)
    elif kind == "cosine":
        decay_fn = optax.cosine_decay_schedule(peak, max(total - warmup, 1), sched.end_factor)
    elif kind == "linear":
        decay_fn = optax.linear_schedule(peak, peak * sched.end_factor, max(total - warmup, 1))
    elif kind == "rsqrt":
        timescale, cooldown = sched.timescale, sched.cooldown_steps

        def decay_fn(step: jax.Array) -> jax.Array:
            value = peak / jnp.sqrt(1.0 + step / timescale)
            if cooldown:
                remaining = (total - warmup) - step
                value = value * jnp.clip(remaining / cooldown, 0.0, 1.0)
            return value

    else:
        raise ValueError(
            f"config.optimizer.schedule.kind={kind!r} is not one of "
            "'constant', 'cosine', 'linear', 'rsqrt'."
        )
    if warmup <= 0:
        return decay_fn
    return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def group_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
    """A tree like `params` whose leaves name each parameter's group ("frozen" or "decay_i")."""
    frozen = [re.compile(p) for p in config.frozen]
    decay = [(re.compile(p), float(d)) for p, d in config.weight_decay]

    def label(path: Sequence[Any], _: Any) -> str:
        name = path_str(path)
        if any(p.fullmatch(name) for p in frozen):
            return FROZEN
        for index, (pattern, _) in enumerate(decay):
            if pattern.fullmatch(name):
                return f"decay_{index}"
        raise ValueError(
            f"Parameter {name!r} matches no regex in config.optimizer.weight_decay "
            f"{[p for p, _ in config.weight_decay]}; add a catch-all ('.*', value) last."
        )

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) for `config.optimizer`; clipping comes first."""
    if config.name != "adamw":
        raise ValueError(f"config.optimizer.name={config.name!r}: only 'adamw' is implemented.")
    schedule = learning_rate_schedule(config)
    groups = {FROZEN: optax.set_to_zero()}
    for index, (_, decay) in enumerate(config.weight_decay):
        groups[f"decay_{index}"] = optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=float(decay)
        )
    labels: Callable[[Any], Any] = lambda params: group_labels(params, config)
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.multi_transform(groups, labels))
    return optax.chain(*parts), schedule
