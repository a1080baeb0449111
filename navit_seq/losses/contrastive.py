"""Image-text contrastive losses (softmax/CLIP and sigmoid/SigLIP): plain and chunked forms.

The plain forms build the full [N, N] logits from the global embeddings; they are the
reference. The chunked forms run under `jax.shard_map` over the data axis: each device keeps
its own image embeddings while the text embeddings travel around a ring of devices
(`lax.ppermute`), so no device ever holds more than one [N/devices, N/devices] block of logits.
Each ring step is rematerialised (`jax.checkpoint`), so the backward pass recomputes a block
instead of keeping every step's block alive.

Conventions shared by every form:
- `logits[i, j] = <img_i, txt_j> / temperature` (CLIP's learned logit scale exp(t) is
  1 / temperature; SigLIP's t' = 10 is temperature 0.1), plus `bias` for the sigmoid loss.
  Embeddings are used as given: the towers L2-normalise them. Statistics are float32.
- `valid[i]` True means example i (image i paired with text i) is real. Padding examples enter
  neither as positives nor as negatives, whatever their embeddings hold (even NaN).
- Normalisation: mean over valid examples. Softmax: the mean of the image->text and
  text->image cross-entropies of each valid example, averaged over valid examples. Sigmoid:
  the sum over all valid (image, text) pairs of -log sigmoid(label * logit), divided by the
  number of valid examples (SigLIP's 1/|B|).
- No valid example at all gives loss 0 with zero gradients, never NaN.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AxisName = str | tuple[str, ...]

# Running (max, sum of exp(x - max)) of a logsumexp, one entry per row (or column).
Stats = tuple[jax.Array, jax.Array]


# ----------------------------------------------------------------------------------------------
# Shared pieces: masking, online logsumexp statistics, per-block sigmoid terms, the mean.


def _zero_padding(emb: jax.Array, valid: jax.Array) -> jax.Array:
    """float32 embeddings with padding rows zeroed, so padding content (even NaN) never leaks."""
    return jnp.where(valid[:, None], emb.astype(jnp.float32), 0.0)


def _pair_logits(img: jax.Array, txt: jax.Array, temperature: jax.Array) -> jax.Array:
    return img @ txt.T / temperature  # [n_img, n_txt]


def _block_stats(logits: jax.Array, pair_valid: jax.Array, axis: int) -> Stats:
    """logsumexp statistics of `logits` along `axis`, invalid pairs excluded."""
    masked = jnp.where(pair_valid, logits, -jnp.inf)
    # The shift is a constant of the logsumexp, so it carries no gradient; a line with no valid
    # entry has max -inf, shifted by 0 instead (exp(-inf - -inf) would be NaN).
    line_max = jax.lax.stop_gradient(jnp.max(masked, axis=axis))
    shift = jnp.where(jnp.isfinite(line_max), line_max, 0.0)
    sum_exp = jnp.sum(jnp.exp(masked - jnp.expand_dims(shift, axis)), axis=axis)
    return line_max, sum_exp


def _merge_stats(a: Stats, b: Stats) -> Stats:
    """Online logsumexp: combine the statistics of two disjoint sets of columns (or rows)."""
    (max_a, sum_a), (max_b, sum_b) = a, b
    new_max = jnp.maximum(max_a, max_b)
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    shift_a = jnp.where(jnp.isfinite(max_a), max_a, 0.0)
    shift_b = jnp.where(jnp.isfinite(max_b), max_b, 0.0)
    return new_max, sum_a * jnp.exp(shift_a - shift) + sum_b * jnp.exp(shift_b - shift)


def _logsumexp(stats: Stats) -> jax.Array:
    """Finish the logsumexp; a line with no valid entry gets a finite placeholder (it is masked
    out of the mean) so that neither the value nor the gradient turns NaN."""
    line_max, sum_exp = stats
    shift = jnp.where(jnp.isfinite(line_max), line_max, 0.0)
    return shift + jnp.log(jnp.where(sum_exp > 0, sum_exp, 1.0))


def _sigmoid_loss_sum(
    logits: jax.Array, pair_valid: jax.Array, positive: jax.Array | None
) -> jax.Array:
    """Sum over valid pairs of -log sigmoid(label * logit); `positive` None: all negatives."""
    signed = logits if positive is None else jnp.where(positive, -logits, logits)
    return jnp.sum(jnp.where(pair_valid, jax.nn.softplus(signed), 0.0))


def _mean_over_valid(
    loss_sum: jax.Array, valid: jax.Array, axis_name: AxisName | None = None
) -> jax.Array:
    num_valid = jnp.sum(valid.astype(jnp.float32))
    if axis_name is not None:
        loss_sum = jax.lax.psum(loss_sum, axis_name)
        num_valid = jax.lax.psum(num_valid, axis_name)
    return loss_sum / jnp.maximum(num_valid, 1.0)


def _check_inputs(img_emb: jax.Array, txt_emb: jax.Array, valid: jax.Array) -> None:
    if img_emb.ndim != 2:
        raise ValueError(
            f"img_emb must be [N, D] (flatten [B, E_max, D] with reshape(-1, D)); "
            f"got shape {img_emb.shape}."
        )
    if txt_emb.shape != img_emb.shape:
        raise ValueError(
            f"txt_emb must have img_emb's shape {img_emb.shape} (text i pairs with image i); "
            f"got {txt_emb.shape}."
        )
    if valid.shape != img_emb.shape[:1] or valid.dtype != jnp.bool_:
        raise ValueError(
            f"valid must be bool [N] = [{img_emb.shape[0]}] (True = real example); got "
            f"{valid.dtype} {valid.shape}. Flatten example_valid [B, E_max] with reshape(-1)."
        )


# ----------------------------------------------------------------------------------------------
# Plain forms: the full [N, N] logits at once.


def softmax_contrastive_loss(
    img_emb: jax.Array, txt_emb: jax.Array, valid: jax.Array, temperature: jax.Array | float
) -> jax.Array:
    """CLIP loss over global embeddings [N, D] with `valid` [N]; builds the full [N, N] logits."""
    _check_inputs(img_emb, txt_emb, valid)
    img, txt = _zero_padding(img_emb, valid), _zero_padding(txt_emb, valid)
    logits = _pair_logits(img, txt, temperature)  # [N, N]
    pair_valid = valid[:, None] & valid[None, :]  # [N, N]
    image_to_text = _logsumexp(_block_stats(logits, pair_valid, axis=1))  # [N]
    text_to_image = _logsumexp(_block_stats(logits, pair_valid, axis=0))  # [N]
    per_example = 0.5 * (image_to_text + text_to_image) - jnp.diagonal(logits)  # [N]
    return _mean_over_valid(jnp.sum(jnp.where(valid, per_example, 0.0)), valid)


def sigmoid_contrastive_loss(
    img_emb: jax.Array,
    txt_emb: jax.Array,
    valid: jax.Array,
    temperature: jax.Array | float,
    bias: jax.Array | float,
) -> jax.Array:
    """SigLIP loss over global embeddings [N, D] with `valid` [N]; builds the full [N, N]
    logits."""
    _check_inputs(img_emb, txt_emb, valid)
    img, txt = _zero_padding(img_emb, valid), _zero_padding(txt_emb, valid)
    logits = _pair_logits(img, txt, temperature) + bias  # [N, N]
    pair_valid = valid[:, None] & valid[None, :]  # [N, N]
    positive = jnp.eye(img.shape[0], dtype=bool)  # [N, N]
    return _mean_over_valid(_sigmoid_loss_sum(logits, pair_valid, positive), valid)


# ----------------------------------------------------------------------------------------------
# Chunked forms: per device, one [n, n] block per ring step (n = N / devices).


def _pass_to_next(tree, axis_name: AxisName, num_devices: int):
    """Send every leaf from ring position i to position i + 1."""
    ring = [(i, (i + 1) % num_devices) for i in range(num_devices)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, ring), tree)


def _ring_softmax(img_emb, txt_emb, valid, temperature, *, axis_name, num_devices):
    """Per device: image->text statistics stay home with the images; text->image statistics
    travel with their text chunk and return home after the last step."""
    img, txt = _zero_padding(img_emb, valid), _zero_padding(txt_emb, valid)  # [n, D]

    @jax.checkpoint
    def block_stats(txt_chunk, txt_valid):
        logits = _pair_logits(img, txt_chunk, temperature)  # [n, n]
        pair_valid = valid[:, None] & txt_valid[None, :]  # [n, n]
        return _block_stats(logits, pair_valid, axis=1), _block_stats(logits, pair_valid, axis=0)

    def ring_step(carry, _):
        txt_chunk, txt_valid, row_stats, col_stats = carry
        txt_chunk, txt_valid, col_stats = _pass_to_next(
            (txt_chunk, txt_valid, col_stats), axis_name, num_devices
        )
        block_rows, block_cols = block_stats(txt_chunk, txt_valid)
        row_stats = _merge_stats(row_stats, block_rows)
        col_stats = _merge_stats(col_stats, block_cols)
        return (txt_chunk, txt_valid, row_stats, col_stats), None

    row_stats, col_stats = block_stats(txt, valid)  # own chunk first
    (_, _, row_stats, col_stats), _ = jax.lax.scan(
        ring_step, (txt, valid, row_stats, col_stats), length=num_devices - 1
    )
    # Device k now holds the statistics of chunk k + 1: one more hop brings them home.
    col_stats = _pass_to_next(col_stats, axis_name, num_devices)
    positive = jnp.sum(img * txt, axis=-1) / temperature  # [n]
    per_example = 0.5 * (_logsumexp(row_stats) + _logsumexp(col_stats)) - positive  # [n]
    return _mean_over_valid(jnp.sum(jnp.where(valid, per_example, 0.0)), valid, axis_name)


def _ring_sigmoid(img_emb, txt_emb, valid, temperature, bias, *, axis_name, num_devices):
    """Per device: the own chunk holds the positives (diagonal); every visiting chunk is all
    negatives. The loss is the sum of per-block terms."""
    img, txt = _zero_padding(img_emb, valid), _zero_padding(txt_emb, valid)  # [n, D]

    @functools.partial(jax.checkpoint, static_argnums=(2,))
    def block_loss(txt_chunk, txt_valid, is_own_chunk: bool):
        logits = _pair_logits(img, txt_chunk, temperature) + bias  # [n, n]
        pair_valid = valid[:, None] & txt_valid[None, :]  # [n, n]
        positive = jnp.eye(img.shape[0], dtype=bool) if is_own_chunk else None
        return _sigmoid_loss_sum(logits, pair_valid, positive)

    def ring_step(carry, _):
        txt_chunk, txt_valid, loss_sum = carry
        txt_chunk, txt_valid = _pass_to_next((txt_chunk, txt_valid), axis_name, num_devices)
        loss_sum = loss_sum + block_loss(txt_chunk, txt_valid, False)
        return (txt_chunk, txt_valid, loss_sum), None

    own = block_loss(txt, valid, True)
    (_, _, loss_sum), _ = jax.lax.scan(ring_step, (txt, valid, own), length=num_devices - 1)
    return _mean_over_valid(loss_sum, valid, axis_name)


def _ring_size(mesh: Mesh, axis_name: AxisName, num_examples: int) -> int:
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    missing = [name for name in names if name not in mesh.shape]
    if missing:
        raise ValueError(
            f"axis_name {axis_name!r} names axes {missing} that the mesh lacks; the mesh has "
            f"{dict(mesh.shape)}. Pass the mesh axis (or axes) the batch is sharded over."
        )
    num_devices = 1
    for name in names:
        num_devices *= mesh.shape[name]
    if num_examples % num_devices:
        raise ValueError(
            f"The number of examples N={num_examples} must be divisible by the {num_devices} "
            f"devices of axis {axis_name!r}; pad the batch with invalid examples to a multiple."
        )
    return num_devices


def chunked_softmax_contrastive_loss(
    img_emb: jax.Array,
    txt_emb: jax.Array,
    valid: jax.Array,
    temperature: jax.Array | float,
    *,
    mesh: Mesh,
    axis_name: AxisName = "data",
) -> jax.Array:
    """`softmax_contrastive_loss` computed in [N/devices]^2 blocks on a ppermute ring over
    `axis_name` (the axis, or axes, the batch is sharded over); equal up to float rounding."""
    _check_inputs(img_emb, txt_emb, valid)
    num_devices = _ring_size(mesh, axis_name, img_emb.shape[0])
    ring = functools.partial(_ring_softmax, axis_name=axis_name, num_devices=num_devices)
    sharded = P(axis_name)
    loss = jax.shard_map(ring, mesh=mesh, in_specs=(sharded, sharded, sharded, P()), out_specs=P())
    return loss(img_emb, txt_emb, valid, jnp.asarray(temperature, jnp.float32))


def chunked_sigmoid_contrastive_loss(
    img_emb: jax.Array,
    txt_emb: jax.Array,
    valid: jax.Array,
    temperature: jax.Array | float,
    bias: jax.Array | float,
    *,
    mesh: Mesh,
    axis_name: AxisName = "data",
) -> jax.Array:
    """`sigmoid_contrastive_loss` computed in [N/devices]^2 blocks on a ppermute ring over
    `axis_name` (the axis, or axes, the batch is sharded over); equal up to float rounding."""
    _check_inputs(img_emb, txt_emb, valid)
    num_devices = _ring_size(mesh, axis_name, img_emb.shape[0])
    ring = functools.partial(_ring_sigmoid, axis_name=axis_name, num_devices=num_devices)
    sharded = P(axis_name)
    loss = jax.shard_map(
        ring, mesh=mesh, in_specs=(sharded, sharded, sharded, P(), P()), out_specs=P()
    )
    scalar = functools.partial(jnp.asarray, dtype=jnp.float32)
    return loss(img_emb, txt_emb, valid, scalar(temperature), scalar(bias))
