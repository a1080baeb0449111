"""The token-label loss (navit_seq.losses.token_labels) against a float64 numpy loop."""

import jax.numpy as jnp
import numpy as np

from navit_seq.losses import token_labels


def test_token_label_sums_match_a_numpy_loop_over_tokens():
    rng = np.random.default_rng(0)
    b, e, g, length, classes = 2, 3, 4, 10, 5
    grids = rng.integers(-1, classes, (b, e, g, g)).astype(np.int32)
    segment_ids = rng.integers(0, e + 1, (b, length)).astype(np.int32)
    coords = rng.integers(0, g, (b, length, 2)).astype(np.int32)
    logits = rng.normal(0, 3, (b, length, classes)).astype(np.float32)
    batch = {"targets": {"token_label_grid": grids}, "segment_ids": segment_ids,
             "patch_coords": coords}  # fmt: skip
    ce_sum, count, right = token_labels.token_label_sums(jnp.asarray(logits), batch)

    want_sum, want_count, want_right = 0.0, 0, 0
    for i in range(b):
        for t in range(length):
            if segment_ids[i, t] == 0:
                continue
            label = grids[i, segment_ids[i, t] - 1, coords[i, t, 0], coords[i, t, 1]]
            if label < 0:
                continue
            z = logits[i, t].astype(np.float64)
            log_probs = z - z.max() - np.log(np.exp(z - z.max()).sum())
            want_sum -= log_probs[label]
            want_count += 1
            want_right += int(np.argmax(z) == label)
    assert want_count > 0
    np.testing.assert_allclose(float(ce_sum), want_sum, rtol=1e-5)
    assert float(count) == want_count and float(right) == want_right
