"""Metric writing: clu writers (TensorBoard + log) plus `metrics.jsonl`, and the NaN/Inf guard.

`DIR/metrics.jsonl` holds one JSON object per logged step and split:
`{"step": 10, "split": "train", "loss": 0.69, ...}`, so scripts and tests read results without
TensorBoard. TensorBoard gets the same scalars as `train/loss`, `eval/loss`, ...
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """A clu MetricWriter appending `{"step", "split", scalars...}` lines to a JSONL file."""

    def __init__(self, path: Path, split: str):
        self._path = Path(path)
        self._split = split

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {"step": int(step), "split": self._split}
        row.update({name: float(value) for name, value in scalars.items()})
        with self._path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write_summaries(self, step, values, metadata=None) -> None:
        pass

    def write_images(self, step, images) -> None:
        pass

    def write_videos(self, step, videos) -> None:
        pass

    def write_audios(self, step, audios, *, sample_rate) -> None:
        pass

    def write_texts(self, step, texts) -> None:
        pass

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        pass

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None) -> None:
        pass

    def write_hparams(self, hparams) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger:
    """Writes a split's scalars to TensorBoard (prefixed `split/`) and to metrics.jsonl.

    Only process 0 writes files; other hosts only log (clu's `just_logging`).
    """

    def __init__(self, workdir: Path | str):
        workdir = Path(workdir)
        self._lead = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(
            str(workdir), just_logging=not self._lead, asynchronous=False
        )
        self._jsonl_path = workdir / "metrics.jsonl"

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        scalars = {name: float(value) for name, value in scalars.items()}
        self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
        if self._lead:
            JsonlWriter(self._jsonl_path, split).write_scalars(step, scalars)

    def truncate_after(self, step: int) -> None:
        """Drops JSONL rows logged after `step` (a resumed run logs those steps again)."""
        if not self._lead or not self._jsonl_path.exists():
            return
        rows = self._jsonl_path.read_text().splitlines()
        kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= step]
        self._jsonl_path.write_text("".join(r + "\n" for r in kept))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NonFiniteError(FloatingPointError):
    """Training produced NaN or Inf; the message names the metric and the last good checkpoint."""


def check_finite(step: int, scalars: Mapping[str, float], last_good_checkpoint: str | None) -> None:
    """Raises NonFiniteError if a scalar (loss, grad norm, ...) is NaN or Inf."""
    bad = {k: v for k, v in scalars.items() if not math.isfinite(float(v))}
    if bad:
        where = (
            f"the last good checkpoint is {last_good_checkpoint}; it resumes from there"
            if last_good_checkpoint
            else "no checkpoint was written yet"
        )
        raise NonFiniteError(
            f"Non-finite metrics at step {step}: {bad}. Training stopped; {where}. "
            "Try a lower config.optimizer.learning_rate, gradient clipping "
            "(config.optimizer.grad_clip_norm) or float32 (config.model.dtype)."
        )


def to_scalars(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """Device scalars -> Python floats (one host transfer)."""
    return {name: float(np.asarray(value)) for name, value in jax.device_get(dict(metrics)).items()}
