"""Optimizer: schedules against their formulas, regex parameter groups, freezing, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from navit_seq import config_common
from navit_seq.train import optimizer as optimizer_lib


def config(**schedule):
    c = config_common.default_optimizer_config()
    c.learning_rate = 0.1
    c.schedule.update(schedule)
    return c


def values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_warmup_is_linear_from_zero_to_peak():
    schedule = optimizer_lib.learning_rate_schedule(config(kind="constant", warmup_steps=10))
    np.testing.assert_allclose(values(schedule, [0, 5, 10, 50]), [0.0, 0.05, 0.1, 0.1], rtol=1e-6)


def test_rsqrt_decays_as_inverse_square_root_after_warmup():
    c = config(kind="rsqrt", warmup_steps=10, timescale=100, decay_steps=1000)
    steps = np.array([10, 110, 410])
    expected = 0.1 / np.sqrt(1.0 + (steps - 10) / 100)
    np.testing.assert_allclose(values(optimizer_lib.learning_rate_schedule(c), steps), expected,
                               rtol=1e-5)  # fmt: skip


def test_rsqrt_cooldown_reaches_zero_at_the_last_step():
    c = config(kind="rsqrt", warmup_steps=0, timescale=100, decay_steps=100, cooldown_steps=20)
    lr = values(optimizer_lib.learning_rate_schedule(c), [0, 80, 90, 100])
    np.testing.assert_allclose(lr[:2], 0.1 / np.sqrt(1 + np.array([0, 80]) / 100), rtol=1e-5)
    np.testing.assert_allclose(lr[2], 0.5 * 0.1 / np.sqrt(1 + 90 / 100), rtol=1e-5)
    assert lr[3] == 0.0


def test_cosine_and_linear_end_at_end_factor_times_peak():
    for kind in ("cosine", "linear"):
        c = config(kind=kind, warmup_steps=10, decay_steps=110, end_factor=0.1)
        lr = values(optimizer_lib.learning_rate_schedule(c), [10, 60, 110])
        np.testing.assert_allclose([lr[0], lr[2]], [0.1, 0.01], rtol=1e-5)
        middle = 0.055 if kind == "linear" else 0.01 + 0.09 * 0.5 * (1 + np.cos(np.pi * 0.5))
        np.testing.assert_allclose(lr[1], middle, rtol=1e-5)


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match="config.optimizer.schedule.kind='step'"):
        optimizer_lib.learning_rate_schedule(config(kind="step"))


def params():
    return {
        "encoder": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))},
        "head": {"kernel": jnp.ones((3, 2))},
    }


def test_weight_decay_groups_by_regex_and_frozen_params_do_not_move():
    c = config(kind="constant")
    c.b1, c.b2 = 0.0, 0.0
    c.weight_decay = ((r"head/.*", 3.0), (r".*", 0.03))
    c.frozen = (r"encoder/bias",)
    c.grad_clip_norm = 0.0
    tx, _ = optimizer_lib.make_optimizer(c)
    p = params()
    zero_grads = jax.tree.map(jnp.zeros_like, p)
    updates, _ = tx.update(zero_grads, tx.init(p), p)
    new = optax.apply_updates(p, updates)
    # Zero gradients: only decoupled decay moves parameters, by lr * wd * p.
    np.testing.assert_allclose(new["head"]["kernel"], 1 - 0.1 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(new["encoder"]["kernel"], 1 - 0.1 * 0.03, rtol=1e-6)
    np.testing.assert_array_equal(new["encoder"]["bias"], 1.0)


def test_parameter_matching_no_decay_regex_raises_naming_it():
    c = config()
    c.weight_decay = ((r"head/.*", 3.0),)
    tx, _ = optimizer_lib.make_optimizer(c)
    with pytest.raises(ValueError, match="'encoder/bias' matches no regex"):
        tx.init(params())


def test_gradients_are_clipped_to_the_configured_global_norm_before_adam():
    c = config(kind="constant")
    c.grad_clip_norm = 1.0
    c.weight_decay = ((".*", 0.0),)
    c.b1, c.b2, c.eps = 0.0, 0.0, 1e3  # a huge eps makes Adam's step linear in the gradient
    tx, _ = optimizer_lib.make_optimizer(c)
    p = {"w": jnp.zeros((4,))}
    grads = {"w": jnp.full((4,), 10.0)}  # global norm 20 -> clipped to 1: each entry 0.5
    updates, _ = tx.update(grads, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 / (0.5 + 1e3), rtol=1e-5)
