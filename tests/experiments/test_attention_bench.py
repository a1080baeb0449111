"""Smoke test of experiments/benchmarks/attention.py on the tiny workload (no timing asserted)."""

import json
import sys
from pathlib import Path

from test_train_step_bench import TINY_WORKLOAD

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"))
import attention  # noqa: E402


def test_prints_one_json_line_with_both_implementations(tmp_path, capsys):
    path = tmp_path / "tiny_workload.json"
    path.write_text(json.dumps(TINY_WORKLOAD))
    results = attention.main(["--workload", str(path), "--warmup", "0", "--repeats", "1"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(json.dumps(results))
    sizes = [(h // 4) * (w // 4) for h, w in TINY_WORKLOAD["images"]]
    assert results["scored_pairs_per_head"] == sum(n * n for n in sizes)
    assert results["all_pairs_per_head"] == results["rows"] * TINY_WORKLOAD["seq_len"] ** 2
    for key in ("xla_forward_backward_s", "fused_forward_backward_s", "forward_backward_speedup"):
        assert results[key] > 0
