"""Contrastive losses: chunked (shard_map ring) == plain == float64 numpy, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from navit_seq.losses import contrastive

NUM_DEVICES = 8
PER_DEVICE = 4  # examples per device
NUM_EXAMPLES = NUM_DEVICES * PER_DEVICE
DIM = 8
TEMPERATURE = 0.3
BIAS = -2.0
# Valid examples per device: uneven, and devices 2 and 5 hold only padding.
UNEVEN_VALID_COUNTS = (4, 1, 0, 3, 2, 0, 4, 1)


# ----------------------------------------------------------------------------------------------
# Float64 numpy reference: the loss on the valid subset only, gradients derived by hand.


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _reference_grads(grad_logits, img, txt, similarity, temperature):
    d_img = grad_logits @ txt / temperature
    d_txt = grad_logits.T @ img / temperature
    d_temperature = -np.sum(grad_logits * similarity) / temperature**2
    return d_img, d_txt, d_temperature


def _reference(kind, img_emb, txt_emb, valid, temperature, bias=0.0):
    """(loss, d_img, d_txt, d_temperature, d_bias) in float64 numpy."""
    index = np.flatnonzero(valid)
    d_img, d_txt = np.zeros(img_emb.shape), np.zeros(txt_emb.shape)
    if index.size == 0:
        return 0.0, d_img, d_txt, 0.0, 0.0
    img, txt = img_emb[index].astype(np.float64), txt_emb[index].astype(np.float64)
    similarity = img @ txt.T
    num_valid = index.size
    eye = np.eye(num_valid)
    if kind == "softmax":
        logits = similarity / temperature
        row_max, col_max = logits.max(1, keepdims=True), logits.max(0, keepdims=True)
        row_exp, col_exp = np.exp(logits - row_max), np.exp(logits - col_max)
        row_lse = np.log(row_exp.sum(1)) + row_max[:, 0]
        col_lse = np.log(col_exp.sum(0)) + col_max[0]
        loss = np.mean(0.5 * (row_lse + col_lse) - np.diag(logits))
        row_softmax = row_exp / row_exp.sum(1, keepdims=True)
        col_softmax = col_exp / col_exp.sum(0, keepdims=True)
        grad_logits = (0.5 * (row_softmax + col_softmax) - eye) / num_valid
    else:
        logits = similarity / temperature + bias
        label = 2.0 * eye - 1.0
        loss = np.sum(_softplus(-label * logits)) / num_valid
        grad_logits = -label * _sigmoid(-label * logits) / num_valid
    grads = _reference_grads(grad_logits, img, txt, similarity, temperature)
    d_img[index], d_txt[index] = grads[0], grads[1]
    return loss, d_img, d_txt, grads[2], np.sum(grad_logits)


# ----------------------------------------------------------------------------------------------
# Inputs and compiled functions (compiled once per module).


def _normalised(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _valid_from_counts(counts):
    return np.concatenate([np.arange(PER_DEVICE) < count for count in counts])


def _inputs(counts, seed=0):
    rng = np.random.default_rng(seed)
    img = _normalised(rng, (NUM_EXAMPLES, DIM))
    txt = _normalised(rng, (NUM_EXAMPLES, DIM))
    valid = _valid_from_counts(counts)
    # Padding content must not matter: make it large so a leak would show.
    img[~valid] *= 1e3
    txt[~valid] *= -1e3
    return img, txt, valid


@functools.cache
def _mesh(axis_shape=(NUM_DEVICES,), axis_names=("data",)):
    devices = jax.devices()[: int(np.prod(axis_shape))]
    return jax.make_mesh(
        axis_shape, axis_names, axis_types=(AxisType.Auto,) * len(axis_shape), devices=devices
    )


@functools.cache
def _loss_and_grads(kind, form, axis_names=("data",), axis_shape=(NUM_DEVICES,)):
    """jit(value_and_grad) of one loss w.r.t. (img, txt, temperature, bias)."""
    mesh = _mesh(axis_shape, axis_names)
    chunked = dict(mesh=mesh, axis_name=axis_names if len(axis_names) > 1 else axis_names[0])

    def loss(img, txt, temperature, bias, valid):
        if kind == "softmax":
            # bias enters as 0 * bias so the same signature serves both kinds.
            args = (img, txt, valid, temperature)
            if form == "plain":
                return contrastive.softmax_contrastive_loss(*args) + 0.0 * bias
            return contrastive.chunked_softmax_contrastive_loss(*args, **chunked) + 0.0 * bias
        args = (img, txt, valid, temperature, bias)
        if form == "plain":
            return contrastive.sigmoid_contrastive_loss(*args)
        return contrastive.chunked_sigmoid_contrastive_loss(*args, **chunked)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def _run(kind, form, img, txt, valid, **mesh_kwargs):
    value, grads = _loss_and_grads(kind, form, **mesh_kwargs)(img, txt, TEMPERATURE, BIAS, valid)
    return [np.asarray(value), *(np.asarray(g) for g in grads)]


def _assert_all_close(actual, expected, rtol, atol):
    names = ("loss", "d_img", "d_txt", "d_temperature", "d_bias")
    for name, a, e in zip(names, actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=name)


KINDS = ("softmax", "sigmoid")
VALIDITY = {
    "all_valid": (PER_DEVICE,) * NUM_DEVICES,
    "uneven_with_padding_only_devices": UNEVEN_VALID_COUNTS,
    "one_valid_example": (0, 0, 0, 0, 0, 1, 0, 0),
}


# ----------------------------------------------------------------------------------------------
# Tests.


def test_numpy_reference_gradients_match_finite_differences():
    img, txt, valid = _inputs(UNEVEN_VALID_COUNTS, seed=1)
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    step = 1e-6
    for kind in KINDS:
        _, d_img, _, d_temperature, d_bias = _reference(kind, img, txt, valid, TEMPERATURE, BIAS)
        for row in np.flatnonzero(valid)[:3]:
            bumped_up, bumped_down = img.copy(), img.copy()
            bumped_up[row, 0] += step
            bumped_down[row, 0] -= step
            up = _reference(kind, bumped_up, txt, valid, TEMPERATURE, BIAS)[0]
            down = _reference(kind, bumped_down, txt, valid, TEMPERATURE, BIAS)[0]
            np.testing.assert_allclose(d_img[row, 0], (up - down) / (2 * step), rtol=1e-6)
        up = _reference(kind, img, txt, valid, TEMPERATURE + step, BIAS)[0]
        down = _reference(kind, img, txt, valid, TEMPERATURE - step, BIAS)[0]
        np.testing.assert_allclose(d_temperature, (up - down) / (2 * step), rtol=1e-6)
        up = _reference(kind, img, txt, valid, TEMPERATURE, BIAS + step)[0]
        down = _reference(kind, img, txt, valid, TEMPERATURE, BIAS - step)[0]
        np.testing.assert_allclose(d_bias, (up - down) / (2 * step), atol=1e-8)


@pytest.mark.parametrize("validity", VALIDITY)
@pytest.mark.parametrize("kind", KINDS)
def test_plain_form_matches_float64_reference(kind, validity):
    img, txt, valid = _inputs(VALIDITY[validity])
    expected = _reference(kind, img, txt, valid, TEMPERATURE, BIAS)
    _assert_all_close(_run(kind, "plain", img, txt, valid), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("validity", VALIDITY)
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_form_matches_plain_form_in_value_and_gradients(kind, validity):
    img, txt, valid = _inputs(VALIDITY[validity])
    plain = _run(kind, "plain", img, txt, valid)
    chunked = _run(kind, "chunked", img, txt, valid)
    _assert_all_close(chunked, plain, rtol=1e-5, atol=1e-6)
    expected = _reference(kind, img, txt, valid, TEMPERATURE, BIAS)
    _assert_all_close(chunked, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_form_over_two_mesh_axes_matches_plain_form(kind):
    img, txt, valid = _inputs(UNEVEN_VALID_COUNTS, seed=2)
    two_axes = dict(axis_names=("data", "fsdp"), axis_shape=(4, 2))
    chunked = _run(kind, "chunked", img, txt, valid, **two_axes)
    _assert_all_close(chunked, _run(kind, "plain", img, txt, valid), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ring_size", (1, 2))
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_form_on_short_rings_matches_plain_form(kind, ring_size):
    img, txt, valid = _inputs(UNEVEN_VALID_COUNTS, seed=4)
    chunked = _run(kind, "chunked", img, txt, valid, axis_shape=(ring_size,))
    _assert_all_close(chunked, _run(kind, "plain", img, txt, valid), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_padding_embeddings_leave_loss_and_gradients_unchanged(kind):
    img, txt, valid = _inputs(UNEVEN_VALID_COUNTS, seed=3)
    clean = _run(kind, "chunked", img, txt, valid)
    img[~valid], txt[~valid] = np.nan, np.inf
    poisoned = _run(kind, "chunked", img, txt, valid)
    _assert_all_close(poisoned, clean, rtol=0, atol=0)


@pytest.mark.parametrize("form", ("plain", "chunked"))
@pytest.mark.parametrize("kind", KINDS)
def test_no_valid_example_gives_zero_loss_and_zero_gradients(kind, form):
    img, txt, valid = _inputs((0,) * NUM_DEVICES)
    value, *grads = _run(kind, form, img, txt, valid)
    assert value == 0.0
    for grad in grads:
        assert np.all(grad == 0.0)


def _chunked_step_temp_bytes(kind, num_devices, per_device, dim):
    """Per-device temp bytes of the compiled value_and_grad of a chunked loss."""
    num_examples = num_devices * per_device
    mesh = jax.make_mesh(
        (num_devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:num_devices]
    )

    def loss(img, txt, temperature, valid):
        if kind == "softmax":
            return contrastive.chunked_softmax_contrastive_loss(
                img, txt, valid, temperature, mesh=mesh
            )
        return contrastive.chunked_sigmoid_contrastive_loss(
            img, txt, valid, temperature, BIAS, mesh=mesh
        )

    shapes = (
        jax.ShapeDtypeStruct((num_examples, dim), jnp.float32),
        jax.ShapeDtypeStruct((num_examples, dim), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
        jax.ShapeDtypeStruct((num_examples,), jnp.bool_),
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_backward_memory_is_a_few_blocks_whatever_the_number_of_devices(kind):
    """Per-device memory of loss + gradients is O(n^2 + n D): a few [n, n] blocks, and no
    per-ring-step residual (autodiff of the scan would keep every visiting [n, D] chunk)."""
    per_device, dim = 256, 64
    block_bytes = per_device * per_device * 4
    on_four = _chunked_step_temp_bytes(kind, 4, per_device, dim)
    on_eight = _chunked_step_temp_bytes(kind, NUM_DEVICES, per_device, dim)
    # Measured ~2 (softmax) and ~3 (sigmoid) blocks on 4 and 8 devices alike. Scan autodiff
    # with a checkpointed block measured ~5 blocks plus N x D x 4 bytes of saved text chunks.
    assert on_eight < 4 * block_bytes, (on_eight, block_bytes)
    assert on_eight <= 1.02 * on_four, (on_eight, on_four)


def test_indivisible_number_of_examples_raises_with_the_fix():
    img, txt, valid = _inputs(UNEVEN_VALID_COUNTS)
    with pytest.raises(ValueError, match=r"N=31 must be divisible by the 8 devices.*pad"):
        contrastive.chunked_softmax_contrastive_loss(
            img[:31], txt[:31], valid[:31], TEMPERATURE, mesh=_mesh()
        )


def test_unknown_axis_name_raises_naming_the_mesh_axes():
    img, txt, valid = _inputs(UNEVEN_VALID_COUNTS)
    with pytest.raises(ValueError, match=r"'batch'.*the mesh has"):
        contrastive.chunked_sigmoid_contrastive_loss(
            img, txt, valid, TEMPERATURE, BIAS, mesh=_mesh(), axis_name="batch"
        )


def test_non_boolean_valid_raises_naming_valid():
    img, txt, valid = _inputs(UNEVEN_VALID_COUNTS)
    with pytest.raises(ValueError, match=r"valid must be bool \[N\] = \[32\].*int32"):
        contrastive.softmax_contrastive_loss(img, txt, valid.astype(np.int32), TEMPERATURE)
