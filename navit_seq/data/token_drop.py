"""Continuous token dropping (NaViT §3.1): per-image drop rates, their schedule, the drop itself.

Pure functions of an explicit `numpy.random.Generator`, so the packer can apply them when it
admits an image to batch `n` and stay exact and checkpointable. Evaluation never drops.

Distributions (`config.kind`):
- `none`: rate 0.
- `constant`: `rate`.
- `beta`: d = u * d_max, u ~ Beta(a, b) with mean m = d_mean / d_max and variance 0.3 m (1 - m),
  i.e. a + b = 1 / 0.3 - 1 = 7 / 3 (the paper's choice).
- `resolution`: d ~ N(mu, std) truncated to mu +- 2 std, where mu rises linearly from d_min to
  d_max as the image's token count goes from `min_tokens` to `max_tokens`.
Schedule (`config.schedule.kind`): `none`, or `sigmoid`:
rho(n) = rho_min + (rho_max - rho_min) * sigmoid((n - mid_step) / temperature), and reversed
(from rho_max down to rho_min) when `decreasing`. It sets the mean rate (`rate` for constant,
`d_mean` for beta); a schedule with `resolution` is rejected (its mean comes from the size).
"""

import math

import ml_collections
import numpy as np
from scipy import special

BETA_VARIANCE_FACTOR = 0.3  # NaViT: Var[u] = 0.3 m (1 - m)
TRUNCATION_SIGMAS = 2.0  # NaViT: resolution-dependent rate truncated at +-2 sigma
DISTRIBUTIONS = ("none", "constant", "beta", "resolution")
SCHEDULES = ("none", "sigmoid")


def default_token_drop_config() -> ml_collections.ConfigDict:
    """Token dropping off; the fields every distribution and the schedule read."""
    return ml_collections.ConfigDict(
        {
            "kind": "none",
            "rate": 0.0,  # constant
            "d_mean": 0.5,  # beta: mean drop rate
            "d_max": 0.9,  # beta and resolution: largest rate
            "d_min": 0.1,  # resolution: rate of the smallest images
            "std": 0.02,  # resolution: std of the truncated normal
            "min_tokens": 16,  # resolution: token count mapped to d_min
            "max_tokens": 256,  # resolution: token count mapped to d_max
            "schedule": {
                "kind": "none",
                "rho_min": 0.2,
                "rho_max": 0.8,
                "mid_step": 0,
                "temperature": 1000.0,
                "decreasing": True,  # the paper's best: start high, end low
            },
        }
    )


def validate_token_drop_config(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming the field and the fix for an unusable configuration."""
    if config.kind not in DISTRIBUTIONS:
        raise ValueError(f"data.token_drop.kind={config.kind!r}; use one of {DISTRIBUTIONS}.")
    if config.schedule.kind not in SCHEDULES:
        raise ValueError(
            f"data.token_drop.schedule.kind={config.schedule.kind!r}; use one of {SCHEDULES}."
        )
    if config.schedule.kind != "none" and config.kind in ("none", "resolution"):
        raise ValueError(
            f"data.token_drop.schedule.kind={config.schedule.kind!r} needs a distribution with a"
            f" mean rate (constant or beta), not kind={config.kind!r}; set schedule.kind='none'."
        )
    if config.kind == "constant" and not 0.0 <= config.rate < 1.0:
        raise ValueError(f"data.token_drop.rate={config.rate}; use a value in [0, 1).")
    if config.kind == "beta" and not 0.0 < config.d_mean < config.d_max < 1.0:
        raise ValueError(
            f"data.token_drop d_mean={config.d_mean}, d_max={config.d_max}; "
            "beta needs 0 < d_mean < d_max < 1."
        )
    if config.kind == "resolution" and not (
        0.0 <= config.d_min <= config.d_max < 1.0 and config.min_tokens < config.max_tokens
    ):
        raise ValueError(
            f"data.token_drop d_min={config.d_min}, d_max={config.d_max}, min_tokens="
            f"{config.min_tokens}, max_tokens={config.max_tokens}; resolution needs "
            "0 <= d_min <= d_max < 1 and min_tokens < max_tokens."
        )
    if config.schedule.kind == "sigmoid" and config.schedule.temperature == 0:
        raise ValueError("data.token_drop.schedule.temperature=0; use a non-zero step scale.")


def scheduled_rate(schedule: ml_collections.ConfigDict, step: int) -> float:
    """rho(step) of the sigmoid schedule (NaViT Fig. 8), decreasing or increasing."""
    z = (step - schedule.mid_step) / schedule.temperature
    rising = 0.5 * (1.0 + math.tanh(0.5 * z))  # sigmoid(z) without overflow
    if schedule.decreasing:
        rising = 1.0 - rising
    return schedule.rho_min + (schedule.rho_max - schedule.rho_min) * rising


def truncated_normal(
    rng: np.random.Generator, mean: float, std: float, low: float, high: float, size=None
) -> np.ndarray | float:
    """N(mean, std) truncated to [low, high], by inverting the normal CDF (exact, no rejection)."""
    lo_cdf, hi_cdf = special.ndtr((low - mean) / std), special.ndtr((high - mean) / std)
    u = rng.uniform(lo_cdf, hi_cdf, size=size)
    return np.clip(mean + std * special.ndtri(u), low, high)


def sample_drop_rate(
    config: ml_collections.ConfigDict, num_tokens: int, step: int, rng: np.random.Generator
) -> float:
    """The drop rate of one image with `num_tokens` tokens admitted at training step `step`."""
    kind = config.kind
    if kind == "none":
        return 0.0
    scheduled = config.schedule.kind == "sigmoid"
    if kind == "constant":
        return scheduled_rate(config.schedule, step) if scheduled else float(config.rate)
    if kind == "beta":
        d_mean = scheduled_rate(config.schedule, step) if scheduled else config.d_mean
        mean = d_mean / config.d_max
        concentration = 1.0 / BETA_VARIANCE_FACTOR - 1.0  # a + b = 7/3
        return float(config.d_max * rng.beta(mean * concentration, (1 - mean) * concentration))
    # resolution
    frac = np.clip(
        (num_tokens - config.min_tokens) / (config.max_tokens - config.min_tokens), 0.0, 1.0
    )
    mu = config.d_min + (config.d_max - config.d_min) * frac
    half_width = TRUNCATION_SIGMAS * config.std
    rate = truncated_normal(rng, mu, config.std, mu - half_width, mu + half_width)
    return float(np.clip(rate, 0.0, 1.0))  # mu +- 2 std may leave [0, 1] near the ends


def num_tokens_kept(num_tokens: int, rate: float) -> int:
    """Tokens an image keeps at drop rate `rate`: round((1 - rate) N), at least one."""
    return max(1, int(round((1.0 - rate) * num_tokens)))


def drop_tokens(
    patches: np.ndarray, patch_coords: np.ndarray, rate: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Keep a uniformly random subset of tokens, in their original order and true coordinates."""
    num_tokens = patches.shape[0]
    keep = num_tokens_kept(num_tokens, rate)
    if keep == num_tokens:
        return patches, patch_coords
    kept = np.sort(rng.choice(num_tokens, size=keep, replace=False))  # [keep]
    return patches[kept], patch_coords[kept]
