"""NaViT §3.1 / §3.4: continuous token dropping at equal compute, and its schedule.

Six arms train `navit_textures` (12 texture classes; longer side ~ U(32, 192), 16 rows x 256
tokens, packed) for 250 steps; they differ only in the per-image drop rate applied before
packing (navit_seq.data.token_drop), so a row filled with thinned images holds more of them:
- `none`: no dropping;
- `constant`: every image drops half its tokens;
- `beta`: d = 0.9 u, u ~ Beta with mean 0.5 / 0.9 (mean rate 0.5, NaViT's variance 0.3 m(1-m));
- `resolution`: d ~ truncated N(mu, 0.02), mu rising from 0.1 (4 tokens) to 0.9 (144 tokens):
  big images lose most, small ones little;
- `beta_increasing` / `beta_decreasing`: the beta arm with its mean rate on a sigmoid schedule
  over training, from 0.2 to 0.8 or from 0.8 to 0.2 (midpoint step 125, temperature 25);
  `beta` is the fixed-rate arm of the schedule comparison (mean 0.5 throughout).
Evaluation never drops tokens: the 1000 validation images at a longer side of 128 px.
"""

RECIPE = "configs/navit_textures.py"
STEPS = 250
COMMON = {
    "num_train_steps": STEPS,
    "eval_every_steps": STEPS // 2,
    "checkpoint_every_steps": STEPS,
    "optimizer.schedule.warmup_steps": 50,
}
BETA = {"data.token_drop.kind": "beta", "data.token_drop.d_mean": 0.5, "data.token_drop.d_max": 0.9}
SCHEDULE = {
    "data.token_drop.schedule.kind": "sigmoid",
    "data.token_drop.schedule.rho_min": 0.2,
    "data.token_drop.schedule.rho_max": 0.8,
    "data.token_drop.schedule.mid_step": STEPS // 2,
    "data.token_drop.schedule.temperature": STEPS / 10,
}
ARMS = {
    "none": {},
    "constant": {"data.token_drop.kind": "constant", "data.token_drop.rate": 0.5},
    "beta": BETA,
    "resolution": {
        "data.token_drop.kind": "resolution",
        "data.token_drop.d_min": 0.1,
        "data.token_drop.d_max": 0.9,
        "data.token_drop.min_tokens": 4,
        "data.token_drop.max_tokens": 144,
    },
    "beta_increasing": {**BETA, **SCHEDULE, "data.token_drop.schedule.decreasing": False},
    "beta_decreasing": {**BETA, **SCHEDULE, "data.token_drop.schedule.decreasing": True},
}
SEEDS = (0, 1, 2)
EVALUATIONS = {"side128": {"data.eval_side": 128}}
METRICS = ("precision_at_1",)
CURVE = "precision_at_1"
COMPUTE = (
    "equal training compute: every arm runs 250 steps of the same [16 rows x 256 tokens] "
    "batches (padding included), the same model and optimizer; dropping thins each image, so "
    "the arms differ in how many images those tokens come from (images_seen)."
)
PAPER = {
    "": "NaViT §3.1 / §3.4 (JFT, B/16): continuous token dropping lets more images into the "
    "same compute and beats no dropping at equal compute; a time-varying rate (sigmoid, "
    "rho in [0.2, 0.8]) helps when it decreases and hurts when it increases: fixed 75.8, "
    "increasing 72.2, decreasing 76.3-76.5 (shared/reference/PAPERS.md §1).",
    "none": "below the dropping arms at equal compute",
    "beta": "fixed schedule: 75.8",
    "beta_increasing": "72.2",
    "beta_decreasing": "76.3-76.5",
}


def _reading(arms: dict, first: str, second: str) -> str:
    key = "side128/precision_at_1"
    a, b = arms[first][key], arms[second][key]
    spread = max(a["std"], b["std"])
    difference = a["mean"] - b["mean"]
    if abs(difference) <= spread:
        return f"{first} ~ {second} ({difference:+.3f}, std <= {spread:.3f})"
    order = ">" if difference > 0 else "<"
    return f"{first} {order} {second} ({difference:+.3f}, std <= {spread:.3f})"


def verdict(table: dict) -> str:
    """Two claims, each read against the seeds' spread: dropping (beta) beats none at equal
    compute, and decreasing > fixed > increasing."""
    arms = table["arms"]
    if not all(arms.get(arm) for arm in ARMS):
        return "inconclusive: not every arm has finished."
    dropping = _reading(arms, "beta", "none")
    decreasing = _reading(arms, "beta_decreasing", "beta")
    increasing = _reading(arms, "beta", "beta_increasing")
    claims = []
    for name, reading, wanted in (
        ("dropping beats none", dropping, "beta > none"),
        ("decreasing beats fixed", decreasing, "beta_decreasing > beta"),
        ("increasing hurts", increasing, "beta > beta_increasing"),
    ):
        if wanted in reading:
            outcome = "reproduced"
        elif "~" in reading:
            outcome = "inconclusive"
        else:
            outcome = "not reproduced"
        claims.append(f"{name}: {outcome} [{reading}]")
    return "; ".join(claims) + "."
