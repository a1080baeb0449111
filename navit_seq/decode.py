"""Autoregressive decoding of Pix2Seq rows: key/value-cached, jitted with static shapes.

The packed images are encoded once and every layer's cross-attention keys/values computed
once; the prompt is read in one pass (prefill), then one token per step with the cache (no
recomputation of the prefix). Methods: greedy, sampling (temperature, top-k, nucleus top-p)
and beam search. Decoding stops as soon as every row has produced the end token (Pix2Seq's
reference code always runs to the maximum length); rows that ended emit END with log-prob 0,
so stopping early changes no result. Grammar constraints are a caller-supplied token mask
(the task codecs know the grammar; nothing here knows a task).
"""

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from navit_seq.models.decoder import CrossKV, KVCache, row_image_mask
from navit_seq.models.pix2seq import Pix2Seq
from navit_seq.tasks.vocab import END

METHODS = ("greedy", "sample", "beam")

# (tokens [B, R', P + max_len] so far, position of the token being chosen) -> allowed tokens,
# bool broadcastable to [B, R', V]; R' = R, or R * beam_size in beam search (row r's beams are
# rows r * K .. r * K + K - 1). It must allow at least one token (e.g. END) everywhere and be
# a hashable, reused object (it is a static argument: a new function recompiles).
TokenMask = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode; static under jit (each distinct value compiles once)."""

    max_len: int  # tokens generated after the prompt
    method: str = "greedy"  # "greedy", "sample" or "beam"
    temperature: float = 1.0  # sample: logits / temperature
    top_k: int = 0  # sample: keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # sample: keep the smallest set with this much probability (1 = all)
    beam_size: int = 4  # beam: hypotheses kept per row (scored by total log-probability)
    early_stop: bool = True  # stop once every row has produced `end_token`
    use_cache: bool = True  # False recomputes the whole prefix each step (reference, benchmark)
    end_token: int = END

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"DecodeConfig method={self.method!r} is not one of {METHODS}.")
        if self.max_len < 1:
            raise ValueError(f"DecodeConfig max_len={self.max_len}: generate at least 1 token.")
        if not self.temperature > 0:
            raise ValueError(
                f"DecodeConfig temperature={self.temperature}: must be > 0 (use method='greedy' "
                "for the argmax)."
            )
        if self.top_k < 0:
            raise ValueError(f"DecodeConfig top_k={self.top_k}: must be >= 0 (0 = off).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"DecodeConfig top_p={self.top_p}: must be in (0, 1] (1 = off).")
        if self.beam_size < 1:
            raise ValueError(f"DecodeConfig beam_size={self.beam_size}: must be >= 1.")


def cyclic_token_mask(allowed: np.ndarray, prompt_length: int) -> TokenMask:
    """A grammar that repeats every `period` tokens after the prompt: the token at position
    prompt_length + i must be allowed by `allowed[i % period]` (bool [period, V]).

    E.g. detection: (coordinate or END, coordinate, coordinate, coordinate, class).
    """
    allowed = np.asarray(allowed, bool)
    if allowed.ndim != 2 or not allowed.any(axis=1).all():
        raise ValueError(
            f"cyclic_token_mask: allowed must be bool [period, V] allowing >= 1 token per "
            f"position; got shape {allowed.shape}."
        )
    table = jnp.asarray(allowed)

    def mask(tokens: jax.Array, position: jax.Array) -> jax.Array:
        del tokens  # the grammar depends on the position only
        return table[(position - prompt_length) % table.shape[0]]  # [V]

    return mask


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """logits [..., V] / temperature, then -inf outside the top-k and outside the nucleus:
    the smallest most-likely set whose probability reaches top_p (the first token always)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [..., 1]
        logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
    if top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [..., V] descending
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        in_nucleus = mass_before < top_p  # a prefix of the sorted tokens
        threshold = jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return logits


@nnx.jit(static_argnames=("config", "token_mask"))
def generate(
    model: Pix2Seq,
    batch: Mapping[str, jax.Array],
    prompt: jax.Array,
    rng: jax.Array,
    config: DecodeConfig,
    token_mask: TokenMask | None = None,
) -> dict[str, jax.Array]:
    """Decodes `config.max_len` tokens after `prompt` [B, R, P] for the rows of `batch`.

    `batch` is the packed batch with `row_slot` [B, R] (docs/architecture.md §9); padding rows
    (slot -1) produce only END. `rng` is used by sampling only. Returns
    `tokens` [B, R, max_len] int32, `token_log_probs` [B, R, max_len] (each chosen token's
    log-probability under the model's constrained distribution at temperature 1; 0 after END),
    `model_log_probs` [B, R, max_len] (the same under the unconstrained distribution: what
    Pix2Seq scores a detection by, the class probability with FAKE and END keeping their mass),
    `score` [B, R] (the sum of `token_log_probs`), `finished` [B, R] (END produced) and
    `num_steps` (decoder calls made: max_len without early stop).
    """
    decoder = model.decoder
    if prompt.ndim != 3 or prompt.shape[:2] != batch["row_slot"].shape or not prompt.shape[2]:
        raise ValueError(
            f"prompt {prompt.shape} must be [B, R, P] with [B, R] = row_slot "
            f"{batch['row_slot'].shape} and P >= 1 (the task prompt token comes first)."
        )
    if prompt.shape[-1] + config.max_len > decoder.max_len:
        raise ValueError(
            f"prompt length {prompt.shape[-1]} + DecodeConfig max_len={config.max_len} exceeds "
            f"model.decoder.max_len={decoder.max_len}: lower max_len."
        )
    encoded = model.encode(batch, deterministic=True)["memory"]  # [B, L, D_memory]
    cross_kv = decoder.cross_keys_values(encoded)  # per layer [B, L, H, Dh], computed once
    cross_attend = row_image_mask(batch["segment_ids"], batch["row_slot"])  # [B, R, L]
    row_task = model.row_tasks(batch)  # [B, R] for a per-task decoder, else None
    if config.method == "beam":
        return _beam_search(decoder, prompt, cross_kv, cross_attend, row_task, config, token_mask)
    return _sample(decoder, prompt, cross_kv, cross_attend, row_task, rng, config, token_mask)


def _next_logits(
    decoder: nnx.Module,
    tokens: jax.Array,
    position: jax.Array,
    cross_kv: CrossKV,
    cross_attend: jax.Array,
    row_task: jax.Array | None,
    cache: KVCache | None,
    use_cache: bool,
) -> tuple[jax.Array, KVCache | None]:
    """Logits [B, R, V] for the token at `position` of `tokens` [B, R, P + max_len]."""
    if use_cache:  # feed only the newest token; earlier positions come from the cache
        newest = jax.lax.dynamic_slice_in_dim(tokens, position - 1, 1, axis=2)  # [B, R, 1]
        logits, cache = decoder.extend(
            newest, position - 1, cross_kv, cross_attend, cache, row_task=row_task
        )
        return logits[:, :, 0], cache
    # The whole prefix again.
    logits, _ = decoder.extend(tokens, 0, cross_kv, cross_attend, row_task=row_task)
    return jax.lax.dynamic_index_in_dim(logits, position - 1, axis=2, keepdims=False), cache


def _constrained_log_probs(
    logits: jax.Array, tokens: jax.Array, position: jax.Array, token_mask: TokenMask | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits with -inf at disallowed tokens, their log-softmax, the log-softmax of the
    unconstrained logits), each [B, R, V]."""
    model_log_probs = jax.nn.log_softmax(logits, axis=-1)
    if token_mask is not None:
        logits = jnp.where(token_mask(tokens, position), logits, -jnp.inf)
    return logits, jax.nn.log_softmax(logits, axis=-1), model_log_probs


def _sample(
    decoder: nnx.Module,
    prompt: jax.Array,
    cross_kv: CrossKV,
    cross_attend: jax.Array,
    row_task: jax.Array | None,
    rng: jax.Array,
    config: DecodeConfig,
    token_mask: TokenMask | None,
) -> dict[str, jax.Array]:
    """Greedy or sampled decoding of every row (see `generate`)."""
    batch, rows, prompt_length = prompt.shape
    total = prompt_length + config.max_len
    tokens = jnp.zeros((batch, rows, total), jnp.int32).at[:, :, :prompt_length].set(prompt)
    log_probs = jnp.zeros((batch, rows, 2, config.max_len), jnp.float32)  # constrained, model
    finished = ~cross_attend.any(-1)  # [B, R]: padding rows are finished before they start

    def choose(logits, step, tokens, log_probs, finished, key):
        position = prompt_length + step
        logits, token_log_probs, model_log_probs = _constrained_log_probs(
            logits, tokens, position, token_mask
        )
        if config.method == "greedy":
            token = jnp.argmax(logits, axis=-1)
        else:
            filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p)
            token = jax.random.categorical(key, filtered, axis=-1)
        token = jnp.where(finished, config.end_token, token).astype(jnp.int32)  # [B, R]
        chosen = jnp.stack(
            [jnp.take_along_axis(lp, token[..., None], axis=-1)[..., 0]
             for lp in (token_log_probs, model_log_probs)], axis=-1,
        )  # [B, R, 2]  # fmt: skip
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, position, axis=2)
        log_probs = jax.lax.dynamic_update_index_in_dim(
            log_probs, jnp.where(finished[..., None], 0.0, chosen), step, axis=3
        )
        return tokens, log_probs, finished | (token == config.end_token)

    cache = decoder.init_cache(batch * rows, total) if config.use_cache else None
    if config.use_cache:  # prefill: the whole prompt in one call
        logits, cache = decoder.extend(prompt, 0, cross_kv, cross_attend, cache, row_task=row_task)
        logits = logits[:, :, -1]  # [B, R, V]
    else:
        logits, _ = _next_logits(
            decoder, tokens, prompt_length, cross_kv, cross_attend, row_task, None, False
        )
    rng, key = jax.random.split(rng)
    tokens, log_probs, finished = choose(logits, 0, tokens, log_probs, finished, key)

    def keep_going(state):
        step, _, _, finished, _, _ = state
        more = step < config.max_len
        return more & ~finished.all() if config.early_stop else more

    def one_step(state):
        step, tokens, log_probs, finished, cache, rng = state
        logits, cache = _next_logits(
            decoder, tokens, prompt_length + step, cross_kv, cross_attend, row_task, cache,
            config.use_cache,
        )  # fmt: skip
        rng, key = jax.random.split(rng)
        tokens, log_probs, finished = choose(logits, step, tokens, log_probs, finished, key)
        return step + 1, tokens, log_probs, finished, cache, rng

    state = (jnp.int32(1), tokens, log_probs, finished, cache, rng)
    num_steps, tokens, log_probs, finished, _, _ = jax.lax.while_loop(keep_going, one_step, state)
    return {
        "tokens": tokens[:, :, prompt_length:],
        "token_log_probs": log_probs[:, :, 0],
        "model_log_probs": log_probs[:, :, 1],
        "score": log_probs[:, :, 0].sum(-1),
        "finished": finished,
        "num_steps": num_steps,
    }


def _beam_search(
    decoder: nnx.Module,
    prompt: jax.Array,
    cross_kv: CrossKV,
    cross_attend: jax.Array,
    row_task: jax.Array | None,
    config: DecodeConfig,
    token_mask: TokenMask | None,
) -> dict[str, jax.Array]:
    """Beam search per row: keeps the `beam_size` prefixes of highest total log-probability;
    a finished hypothesis keeps its score (it only extends by END at log-prob 0), so the best
    finished one is final once every live beam has finished. Returns the best beam."""
    batch, rows, prompt_length = prompt.shape
    beams, vocab = config.beam_size, decoder.vocab_size
    total = prompt_length + config.max_len
    # Beams are extra decoder rows: row r's beams are rows r * K .. r * K + K - 1 of packed
    # row b, so they share its encoder keys/values like any other row.
    beam_attend = jnp.repeat(cross_attend, beams, axis=1)  # [B, R*K, L]
    beam_task = None if row_task is None else jnp.repeat(row_task, beams, axis=1)  # [B, R*K]
    cache = decoder.init_cache(batch * rows, total) if config.use_cache else None
    if config.use_cache:
        logits, cache = decoder.extend(prompt, 0, cross_kv, cross_attend, cache, row_task=row_task)
        logits = jnp.repeat(logits[:, :, -1], beams, axis=1)  # [B, R*K, V]
        cache = jax.tree.map(lambda c: jnp.repeat(c, beams, axis=0), cache)  # [N*K, ...]
    tokens = jnp.zeros((batch, rows * beams, total), jnp.int32)
    tokens = tokens.at[:, :, :prompt_length].set(jnp.repeat(prompt, beams, axis=1))
    if not config.use_cache:
        logits, _ = _next_logits(
            decoder, tokens, prompt_length, cross_kv, beam_attend, beam_task, None, False
        )
    # Only beam 0 is live at first (all beams hold the same prompt).
    scores = jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf), (batch, rows, 1))
    finished = jnp.repeat(~cross_attend.any(-1), beams, axis=1).reshape(batch, rows, beams)
    log_probs = jnp.zeros((batch, rows, beams, 2, config.max_len), jnp.float32)  # constr., model
    end_only = jnp.where(jnp.arange(vocab) == config.end_token, 0.0, -jnp.inf)  # [V]

    def advance(logits, step, tokens, log_probs, scores, finished, cache):
        position = prompt_length + step
        _, token_log_probs, model_log_probs = _constrained_log_probs(
            logits, tokens, position, token_mask
        )
        token_log_probs = token_log_probs.reshape(batch, rows, beams, vocab)
        token_log_probs = jnp.where(finished[..., None], end_only, token_log_probs)
        model_log_probs = model_log_probs.reshape(batch, rows, beams, vocab)
        model_log_probs = jnp.where(finished[..., None], end_only, model_log_probs)
        candidates = (scores[..., None] + token_log_probs).reshape(batch, rows, beams * vocab)
        scores, best = jax.lax.top_k(candidates, beams)  # [B, R, K], ties: lowest index first
        parent, token = best // vocab, (best % vocab).astype(jnp.int32)  # [B, R, K]
        chosen = jnp.stack(
            [jnp.take_along_axis(lp.reshape(batch, rows, beams * vocab), best, axis=-1)
             for lp in (token_log_probs, model_log_probs)], axis=-1,
        )  # [B, R, K, 2]  # fmt: skip

        def by_parent(x):  # reorder per-beam arrays [B, R, K, ...] by parent beam
            index = parent.reshape(parent.shape + (1,) * (x.ndim - 3))
            return jnp.take_along_axis(x, index, axis=2)

        tokens = by_parent(tokens.reshape(batch, rows, beams, total))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, position, axis=3)
        log_probs = jax.lax.dynamic_update_index_in_dim(by_parent(log_probs), chosen, step, axis=4)
        finished = by_parent(finished) | (token == config.end_token)
        if cache is not None:  # [B*R*K, T, H, Dh] rows follow their parents
            cache = jax.tree.map(
                lambda c: by_parent(c.reshape(batch, rows, beams, *c.shape[1:])).reshape(c.shape),
                cache,
            )
        tokens = tokens.reshape(batch, rows * beams, total)
        return tokens, log_probs, scores, finished, cache

    tokens, log_probs, scores, finished, cache = advance(
        logits, 0, tokens, log_probs, scores, finished, cache
    )

    def keep_going(state):
        step, _, _, scores, finished, _ = state
        more = step < config.max_len
        live = ~finished & jnp.isfinite(scores)
        return more & live.any() if config.early_stop else more

    def one_step(state):
        step, tokens, log_probs, scores, finished, cache = state
        logits, cache = _next_logits(
            decoder, tokens, prompt_length + step, cross_kv, beam_attend, beam_task, cache,
            config.use_cache,
        )  # fmt: skip
        return step + 1, *advance(logits, step, tokens, log_probs, scores, finished, cache)

    state = (jnp.int32(1), tokens, log_probs, scores, finished, cache)
    num_steps, tokens, log_probs, scores, finished, _ = jax.lax.while_loop(
        keep_going, one_step, state
    )
    best = tokens.reshape(batch, rows, beams, total)[:, :, 0]  # top_k keeps beams sorted
    return {
        "tokens": best[:, :, prompt_length:],
        "token_log_probs": log_probs[:, :, 0, 0],
        "model_log_probs": log_probs[:, :, 0, 1],
        "score": scores[:, :, 0],
        "finished": finished[:, :, 0],
        "num_steps": num_steps,
    }
