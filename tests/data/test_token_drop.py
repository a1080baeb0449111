"""Token-drop rate distributions, the sigmoid schedule, and the drop itself."""

import numpy as np
import pytest
from scipy import stats

from navit_seq.data import token_drop


def drop_config(kind: str, **overrides):
    config = token_drop.default_token_drop_config()
    config.kind = kind
    config.update(overrides)
    token_drop.validate_token_drop_config(config)
    return config


def sample_rates(config, num_tokens=100, step=0, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([token_drop.sample_drop_rate(config, num_tokens, step, rng) for _ in range(n)])


def test_beta_rates_follow_the_papers_beta_distribution():
    config = drop_config("beta", d_mean=0.4, d_max=0.8)
    rates = sample_rates(config)
    m = 0.4 / 0.8
    a, b = m * 7 / 3, (1 - m) * 7 / 3  # variance 0.3 m (1 - m) -> a + b = 7/3
    assert stats.kstest(rates, stats.beta(a, b, scale=0.8).cdf).pvalue > 0.01
    assert rates.mean() == pytest.approx(0.4, abs=0.01)
    assert (rates / 0.8).var() == pytest.approx(0.3 * m * (1 - m), rel=0.1)


def test_resolution_rates_are_truncated_normal_with_mean_rising_with_tokens():
    config = drop_config(
        "resolution", d_min=0.2, d_max=0.6, std=0.02, min_tokens=16, max_tokens=256
    )
    for num_tokens, mu in ((16, 0.2), (136, 0.4), (256, 0.6), (1000, 0.6)):
        rates = sample_rates(config, num_tokens=num_tokens, n=2000)
        assert np.all(np.abs(rates - mu) <= 2 * 0.02 + 1e-9)
        assert rates.mean() == pytest.approx(mu, abs=0.002)
        reference = stats.truncnorm(-2, 2, loc=mu, scale=0.02)
        assert stats.kstest(rates, reference.cdf).pvalue > 0.01


def test_constant_rate_is_exact():
    assert set(sample_rates(drop_config("constant", rate=0.25), n=10)) == {0.25}


def test_sigmoid_schedule_decreases_from_rho_max_to_rho_min():
    schedule = drop_config("constant").schedule
    schedule.update(kind="sigmoid", rho_min=0.2, rho_max=0.8, mid_step=1000, temperature=100)
    assert token_drop.scheduled_rate(schedule, 0) == pytest.approx(0.8, abs=1e-4)
    assert token_drop.scheduled_rate(schedule, 1000) == pytest.approx(0.5)
    assert token_drop.scheduled_rate(schedule, 5000) == pytest.approx(0.2, abs=1e-4)
    schedule.decreasing = False
    assert token_drop.scheduled_rate(schedule, 0) == pytest.approx(0.2, abs=1e-4)


def test_schedule_sets_the_beta_mean():
    config = drop_config("beta", d_max=0.9)
    config.schedule.update(kind="sigmoid", rho_min=0.2, rho_max=0.8, mid_step=0, temperature=1)
    assert sample_rates(config, step=10_000).mean() == pytest.approx(0.2, abs=0.01)


def test_schedule_with_resolution_dependent_rates_is_rejected():
    config = token_drop.default_token_drop_config()
    config.kind = "resolution"
    config.schedule.kind = "sigmoid"
    with pytest.raises(ValueError, match="schedule.kind='none'"):
        token_drop.validate_token_drop_config(config)


def test_drop_keeps_true_coordinates_in_order():
    rng = np.random.default_rng(0)
    coords = np.stack(np.divmod(np.arange(40), 8), -1).astype(np.int32)  # [40, 2]
    tokens = np.arange(40)[:, None].repeat(3, 1).astype(np.uint8)  # token i holds value i
    kept_tokens, kept_coords = token_drop.drop_tokens(tokens, coords, 0.25, rng)
    assert len(kept_tokens) == 30
    index = kept_tokens[:, 0].astype(int)
    assert np.all(np.diff(index) > 0)
    np.testing.assert_array_equal(kept_coords, coords[index])


def test_every_image_keeps_at_least_one_token():
    assert token_drop.num_tokens_kept(3, 0.99) == 1
