"""Image-text contrastive losses (softmax/CLIP and sigmoid/SigLIP): plain and chunked forms.

The plain forms build the full [N, N] logits from the global embeddings; they are the
reference. The chunked forms run under `jax.shard_map` over the data axis: each device keeps
its own image embeddings while the text embeddings travel around a ring of devices
(`lax.ppermute`), so no device ever holds more than one [N/devices, N/devices] block of logits.
The backward pass is rematerialised: it runs the ring again and recomputes each block from the
saved per-device logsumexp statistics, so per-device memory is O(n^2 + n D) (n = N / devices)
for loss and gradients together, independent of the number of devices.

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

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The devices of `axis_name` in a ring: position i sends to position i + 1."""

    axis_name: AxisName
    num_devices: int

    def pass_to_next(self, tree):
        pairs = [(i, (i + 1) % self.num_devices) for i in range(self.num_devices)]
        return jax.tree.map(lambda x: jax.lax.ppermute(x, self.axis_name, pairs), tree)

    def visit_all_chunks(self, block_fn, home_acc, chunk, chunk_acc):
        """Apply `block_fn(home_acc, chunk, chunk_acc, is_own_chunk) -> (home_acc, chunk_acc)`
        to the device's own chunk, then to every other device's chunk as it comes round the
        ring. `chunk_acc` travels with its chunk and is back on the chunk's home device at the
        end. Only one block is alive at a time: nothing per step is kept for a backward pass."""
        home_acc, chunk_acc = block_fn(home_acc, chunk, chunk_acc, True)

        def ring_step(carry, _):
            home_acc, chunk, chunk_acc = carry
            chunk, chunk_acc = self.pass_to_next((chunk, chunk_acc))
            home_acc, chunk_acc = block_fn(home_acc, chunk, chunk_acc, False)
            return (home_acc, chunk, chunk_acc), None

        (home_acc, _, chunk_acc), _ = jax.lax.scan(
            ring_step, (home_acc, chunk, chunk_acc), length=self.num_devices - 1
        )
        # Device k now holds the accumulators of chunk k + 1: one more hop brings them home.
        return home_acc, self.pass_to_next(chunk_acc)


# The ring functions below have hand-written VJPs that run the ring a second time and
# recompute each block (flash-attention style). Autodiff through the scan, even with
# `jax.checkpoint` around each block, keeps every visiting text chunk as a residual: O(N x D)
# per device, which outgrows the O(n^2) blocks when there are many devices.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_logsumexp(img, txt, valid, temperature, ring: _Ring):
    """Per device: logsumexp over all valid texts for each local image (rows, [n]) and over
    all valid images for each local text (columns, [n]), from padding-zeroed embeddings."""
    return _ring_logsumexp_fwd(img, txt, valid, temperature, ring)[0]


def _ring_logsumexp_fwd(img, txt, valid, temperature, ring: _Ring):
    def block(row_stats, chunk, col_stats, is_own_chunk):
        txt_chunk, chunk_valid = chunk
        logits = _pair_logits(img, txt_chunk, temperature)  # [n, n]
        pair_valid = valid[:, None] & chunk_valid[None, :]  # [n, n]
        row_stats = _merge_stats(row_stats, _block_stats(logits, pair_valid, axis=1))
        col_stats = _merge_stats(col_stats, _block_stats(logits, pair_valid, axis=0))
        return row_stats, col_stats

    empty = (jnp.full(valid.shape, -jnp.inf), jnp.zeros(valid.shape))  # no entry yet
    row_stats, col_stats = ring.visit_all_chunks(block, empty, (txt, valid), empty)
    row_lse, col_lse = _logsumexp(row_stats), _logsumexp(col_stats)  # [n], [n]
    return (row_lse, col_lse), (img, txt, valid, temperature, row_lse, col_lse)


def _ring_logsumexp_bwd(ring: _Ring, residuals, cotangents):
    img, txt, valid, temperature, row_lse, col_lse = residuals
    row_grad, col_grad = cotangents  # [n], [n]

    def block(home_grads, chunk, d_txt_chunk, is_own_chunk):
        d_img, d_temperature = home_grads
        txt_chunk, chunk_valid, chunk_col_lse, chunk_col_grad = chunk
        logits = _pair_logits(img, txt_chunk, temperature)  # [n, n]
        pair_valid = valid[:, None] & chunk_valid[None, :]  # [n, n]
        # d lse / d logits is the softmax: exp(logits - lse) along each direction.
        row_softmax = jnp.exp(jnp.where(pair_valid, logits - row_lse[:, None], -jnp.inf))
        col_softmax = jnp.exp(jnp.where(pair_valid, logits - chunk_col_lse[None, :], -jnp.inf))
        d_logits = row_grad[:, None] * row_softmax + chunk_col_grad[None, :] * col_softmax
        d_img = d_img + d_logits @ txt_chunk / temperature
        d_txt_chunk = d_txt_chunk + d_logits.T @ img / temperature
        d_temperature = d_temperature - jnp.sum(d_logits * logits) / temperature
        return (d_img, d_temperature), d_txt_chunk

    chunk = (txt, valid, col_lse, col_grad)
    zeros = (jnp.zeros_like(img), jnp.zeros((), jnp.float32))
    (d_img, d_temperature), d_txt = ring.visit_all_chunks(block, zeros, chunk, jnp.zeros_like(txt))
    return d_img, d_txt, None, jax.lax.psum(d_temperature, ring.axis_name)


_ring_logsumexp.defvjp(_ring_logsumexp_fwd, _ring_logsumexp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring_sigmoid_loss_sum(img, txt, valid, temperature, bias, ring: _Ring):
    """Per device: sum of the sigmoid loss terms of its images against all texts. The own
    chunk holds the positives (its diagonal); every visiting chunk is all negatives."""
    return _ring_sigmoid_loss_sum_fwd(img, txt, valid, temperature, bias, ring)[0]


def _sigmoid_block(img, txt_chunk, valid, chunk_valid, temperature, bias, is_own_chunk):
    """(similarity [n, n], logits [n, n], pair_valid [n, n], positive [n, n] or None)."""
    similarity = img @ txt_chunk.T  # [n, n]
    logits = similarity / temperature + bias  # [n, n]
    pair_valid = valid[:, None] & chunk_valid[None, :]  # [n, n]
    positive = jnp.eye(img.shape[0], dtype=bool) if is_own_chunk else None
    return similarity, logits, pair_valid, positive


def _ring_sigmoid_loss_sum_fwd(img, txt, valid, temperature, bias, ring: _Ring):
    def block(loss_sum, chunk, no_chunk_acc, is_own_chunk):
        txt_chunk, chunk_valid = chunk
        _, logits, pair_valid, positive = _sigmoid_block(
            img, txt_chunk, valid, chunk_valid, temperature, bias, is_own_chunk
        )
        return loss_sum + _sigmoid_loss_sum(logits, pair_valid, positive), no_chunk_acc

    zero = jnp.zeros((), jnp.float32)
    loss_sum, _ = ring.visit_all_chunks(block, zero, (txt, valid), ())
    return loss_sum, (img, txt, valid, temperature, bias)


def _ring_sigmoid_loss_sum_bwd(ring: _Ring, residuals, loss_grad):
    img, txt, valid, temperature, bias = residuals

    def block(home_grads, chunk, d_txt_chunk, is_own_chunk):
        d_img, d_temperature, d_bias = home_grads
        txt_chunk, chunk_valid = chunk
        similarity, logits, pair_valid, positive = _sigmoid_block(
            img, txt_chunk, valid, chunk_valid, temperature, bias, is_own_chunk
        )
        # d softplus(-label * logit) / d logit = sigmoid(logit) - [label is positive].
        target = 0.0 if positive is None else positive.astype(jnp.float32)
        d_logits = loss_grad * jnp.where(pair_valid, jax.nn.sigmoid(logits) - target, 0.0)
        d_img = d_img + d_logits @ txt_chunk / temperature
        d_txt_chunk = d_txt_chunk + d_logits.T @ img / temperature
        d_temperature = d_temperature - jnp.sum(d_logits * similarity) / temperature**2
        return (d_img, d_temperature, d_logits.sum() + d_bias), d_txt_chunk

    zero = jnp.zeros((), jnp.float32)
    (d_img, d_temperature, d_bias), d_txt = ring.visit_all_chunks(
        block, (jnp.zeros_like(img), zero, zero), (txt, valid), jnp.zeros_like(txt)
    )
    d_temperature, d_bias = jax.lax.psum((d_temperature, d_bias), ring.axis_name)
    return d_img, d_txt, None, d_temperature, d_bias


_ring_sigmoid_loss_sum.defvjp(_ring_sigmoid_loss_sum_fwd, _ring_sigmoid_loss_sum_bwd)


def _chunked_softmax(img_emb, txt_emb, valid, temperature, *, ring: _Ring):
    img, txt = _zero_padding(img_emb, valid), _zero_padding(txt_emb, valid)  # [n, D]
    row_lse, col_lse = _ring_logsumexp(img, txt, valid, temperature, ring)  # [n], [n]
    positive = jnp.sum(img * txt, axis=-1) / temperature  # [n]
    per_example = 0.5 * (row_lse + col_lse) - positive  # [n]
    return _mean_over_valid(jnp.sum(jnp.where(valid, per_example, 0.0)), valid, ring.axis_name)


def _chunked_sigmoid(img_emb, txt_emb, valid, temperature, bias, *, ring: _Ring):
    img, txt = _zero_padding(img_emb, valid), _zero_padding(txt_emb, valid)  # [n, D]
    loss_sum = _ring_sigmoid_loss_sum(img, txt, valid, temperature, bias, ring)
    return _mean_over_valid(loss_sum, valid, ring.axis_name)


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
    ring = _Ring(axis_name, _ring_size(mesh, axis_name, img_emb.shape[0]))
    sharded = P(axis_name)
    loss = jax.shard_map(
        functools.partial(_chunked_softmax, ring=ring),
        mesh=mesh,
        in_specs=(sharded, sharded, sharded, P()),
        out_specs=P(),
    )
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
    ring = _Ring(axis_name, _ring_size(mesh, axis_name, img_emb.shape[0]))
    sharded = P(axis_name)
    loss = jax.shard_map(
        functools.partial(_chunked_sigmoid, ring=ring),
        mesh=mesh,
        in_specs=(sharded, sharded, sharded, P(), P()),
        out_specs=P(),
    )
    scalar = functools.partial(jnp.asarray, dtype=jnp.float32)
    return loss(img_emb, txt_emb, valid, scalar(temperature), scalar(bias))
