"""Learning-curve pictures from a workdir's metrics.jsonl (and evaluate's eval_results.json)."""

import json

import pytest
from PIL import Image

from navit_seq import plot


def _workdir(tmp_path, name="run"):
    workdir = tmp_path / name
    workdir.mkdir()
    rows = [
        {"step": 10, "split": "train", "loss": 3.0, "loss/detection": 3.5, "learning_rate": 1e-3},
        {"step": 20, "split": "train", "loss": 2.5, "loss/captioning": 2.0, "learning_rate": 5e-4},
        {"step": 20, "split": "eval", "loss": 2.7, "bbox_AP": 0.1, "bbox_num_gt": 30.0},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "spl'  # killed mid-write
    (workdir / "metrics.jsonl").write_text(text)
    results = {"step": 30, "metrics": {"bbox_AP": 0.2, "caption_CIDEr": 0.5}}
    (workdir / "eval_results.json").write_text(json.dumps(results))
    return workdir


def test_series_skip_steps_without_the_key_and_add_the_final_evaluation(tmp_path):
    rows = plot.read_metrics(_workdir(tmp_path))
    assert plot.series(rows, "train", "loss/captioning") == ([20], [2.0])
    assert plot.series(rows, "eval", "bbox_AP") == ([20, 30], [0.1, 0.2])
    assert plot.series(rows, "eval", "caption_CIDEr") == ([30], [0.5])
    assert not plot._is_quality("bbox_num_gt") and plot._is_quality("bbox_AP50")


def test_command_writes_a_png_per_workdir_or_one_for_several(tmp_path):
    first, second = _workdir(tmp_path, "a"), _workdir(tmp_path, "b")
    assert plot.main([str(first)]) == 0
    with Image.open(first / plot.DEFAULT_PICTURE) as picture:
        assert picture.width > 800
    assert plot.main([str(first), str(second), "--output", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 1000
    with pytest.raises(SystemExit):  # several workdirs need --output
        plot.main([str(first), str(second)])
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.read_metrics(tmp_path)
