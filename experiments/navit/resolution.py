"""NaViT §3.2 / Fig. 6: variable vs fixed training resolution, evaluated across resolutions.

Both arms train the `navit_shapes` recipe (one-object scene classification, 12 shapes) for the
same number of steps of 16 rows x 256 tokens; they differ only in the training resolution:
`variable` samples the longer side ~ U(48, 192) px per image (NaViT), `fixed128` resizes every
image to a longer side of 128 px (aspect ratio kept; the fixed-resolution baseline). Each final
checkpoint is evaluated on the 1000 validation images at longer sides of 32, 128 and 256 px
(32 and 256 are outside both training ranges).
"""

RECIPE = "configs/navit_shapes.py"
COMMON = {"num_train_steps": 400, "eval_every_steps": 400, "checkpoint_every_steps": 400}
ARMS = {
    "variable": {"data.resolution.min_side": 48, "data.resolution.max_side": 192},
    "fixed128": {"data.resolution.min_side": 128, "data.resolution.max_side": 128},
}
SEEDS = (0, 1, 2)
EVALUATIONS = {f"side{side}": {"data.eval_side": side} for side in (32, 128, 256)}
METRICS = ("precision_at_1",)
COMPUTE = (
    "equal training FLOPs: both arms run 400 steps of the same 16 x 256-token batches "
    "(padding included: tokens_processed below; tokens_seen counts real tokens), the same "
    "model and optimizer; the variable arm sees more, smaller images per step (images_seen)."
)
PAPER = {
    "": "NaViT Fig. 6 (ImageNet, B/16): a model trained at variable resolution "
    "(R ~ U(64, 512)) is at or above each fixed-resolution model at every test resolution, "
    "and holds up at resolutions it never trained at, where fixed-resolution models fall off "
    "away from their training size.",
    "variable": "flat across test resolutions; >= fixed everywhere",
    "fixed128": "peaks at its training size (128)",
}


def verdict(table: dict) -> str:
    """Reproduced when variable >= fixed128 at every test side outside one pooled std, except
    within noise at fixed128's own size; inconclusive when the differences sit inside it."""
    arms = table["arms"]
    if not all(arms.get(arm) for arm in ARMS):
        return "inconclusive: not every arm has finished."
    readings = []
    for name in EVALUATIONS:
        key = f"{name}/precision_at_1"
        variable, fixed = arms["variable"][key], arms["fixed128"][key]
        spread = max(variable["std"], fixed["std"])
        difference = variable["mean"] - fixed["mean"]
        if abs(difference) <= spread:
            readings.append((name, "tie"))
        else:
            readings.append((name, "variable" if difference > 0 else "fixed128"))
    text = ", ".join(f"{name}: {winner}" for name, winner in readings)
    if any(winner == "fixed128" for _, winner in readings):
        return f"not reproduced ({text})."
    if all(winner == "variable" for name, winner in readings if name != "side128"):
        return f"reproduced ({text}; differences larger than the seeds' spread)."
    return f"inconclusive ({text}; some differences inside the seeds' spread)."
