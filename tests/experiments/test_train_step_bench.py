"""Smoke test of experiments/benchmarks/train_step.py on a tiny model and workload.

It checks that every code path runs and what the benchmark reports is consistent; it asserts
no timing (timings live in the benchmark's output, not in tests).
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import flops  # noqa: E402
import train_step  # noqa: E402

HAS_PEER = all(importlib.util.find_spec(name) for name in ("torch", "einops", "vit_pytorch"))

TINY_WORKLOAD = {
    "patch_size": 4,
    "channels": 3,
    "seq_len": 16,
    "max_examples_per_seq": 3,
    "model": {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64, "num_classes": 10},
    "optimizer": "adamw",
    "dtype": "float32",
    "seed": 0,
    "real_tokens": 34,
    "images": [[8, 8], [12, 8], [8, 12], [12, 12], [4, 4], [16, 4], [8, 4], [4, 8]],
}
JSON_KEYS = (
    "tokens_per_s", "images_per_s", "peer_tokens_per_s", "packed_step_s", "fixed_len_step_s",
    "mfu", "matmul_peak_flops", "step_flops", "useful_step_flops", "xla_step_flops",
    "attention_impl", "packed_xla_step_s", "xla_attention_mfu",
)  # fmt: skip


@pytest.fixture(scope="module")
def workload_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny_workload.json"
    path.write_text(json.dumps(TINY_WORKLOAD))
    return path


@pytest.fixture(scope="module")
def printed_results(workload_path) -> dict:
    """Runs the benchmark's main once (the peer too when vit-pytorch is installed)."""
    argv = ["--workload", str(workload_path), "--steps", "1", "--warmup", "0"]
    argv += ["--peer-steps", "1", "--peer-warmup", "0", "--peak-size", "64", "--peak-repeats", "1"]
    argv += ["--glibc-defaults", "--async-dispatch"]  # leave this pytest worker's settings
    argv += [] if HAS_PEER else ["--skip-peer"]
    return train_step.main(argv)


def test_main_prints_one_json_line_last_with_the_reported_keys(printed_results, capsys):
    # main() already ran in the fixture; its stdout may have gone to an earlier test's capture,
    # so rerun the printing path cheaply on the same results.
    train_step.print_results(printed_results)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(json.dumps(printed_results))
    missing = [key for key in JSON_KEYS if key not in printed_results]
    assert not missing
    assert printed_results["images"] == len(TINY_WORKLOAD["images"])
    assert printed_results["real_tokens"] == TINY_WORKLOAD["real_tokens"]


def test_fused_cpu_is_the_cpu_default_and_xla_is_timed_once_when_asked_for(
    printed_results, workload_path
):
    assert printed_results["attention_impl"] == "fused_cpu"
    argv = ["--workload", str(workload_path), "--steps", "1", "--warmup", "0", "--skip-peer"]
    argv += ["--peak-size", "64", "--peak-repeats", "1", "--glibc-defaults", "--async-dispatch"]
    results = train_step.main([*argv, "--attention-impl", "xla"])
    assert results["attention_impl"] == "xla"
    assert results["packed_step_s"] == results["packed_xla_step_s"]  # one step, timed once
    assert results["step_flops"] == flops.packed_step_flops(
        flops.ModelShape(32, 1, 64, 10, 4 * 4 * 3), results["rows"], 16, 3
    )


@pytest.mark.skipif(not HAS_PEER, reason="vit-pytorch not installed (pip install -e '.[bench]')")
def test_peer_step_runs_on_the_same_images(printed_results):
    assert printed_results["peer_step_s"] > 0
    assert printed_results["peer_tokens_per_s"] == pytest.approx(
        printed_results["real_tokens"] / printed_results["peer_step_s"]
    )


def test_packed_batch_holds_every_patch_of_every_image_once(workload_path):
    workload = train_step.load_workload(workload_path)
    images, labels = train_step.random_images(workload), train_step.random_labels(workload)
    batch = train_step.pack_workload(images, labels, workload)
    rows = batch["segment_ids"].shape[0]
    assert rows == 3  # first fit: 4+6+6 | 9+1+4 | 2+2 tokens (E_max = 3)
    packed_images = [
        (
            batch["patches"][row, batch["segment_ids"][row] == slot + 1],
            batch["targets"]["labels"][row, slot],
        )
        for row in range(rows)
        for slot in np.flatnonzero(batch["example_valid"][row])
    ]
    # Random pixels identify each image; its patches and label must appear exactly once.
    for image, label in zip(images, labels, strict=True):
        image_patches, *_ = train_step.patches.patchify(image, workload.patch_size)
        matches = [
            np.array_equal(found, image_patches) and np.array_equal(found_label, label)
            for found, found_label in packed_images
        ]
        assert sum(matches) == 1
    assert len(packed_images) == len(images)


def test_fixed_length_batch_has_one_full_segment_per_row(workload_path):
    workload = train_step.load_workload(workload_path)
    images, labels = train_step.random_images(workload), train_step.random_labels(workload)
    fixed = train_step.fixed_length_batch(train_step.pack_workload(images, labels, workload))
    assert (fixed["segment_ids"] == 1).all()
    assert fixed["example_valid"].sum(1).tolist() == [1] * fixed["segment_ids"].shape[0]
    rows, cols = fixed["image_grid"][0, 0]
    assert rows * cols == TINY_WORKLOAD["seq_len"]
    assert fixed["patch_coords"].max(axis=(0, 1)).tolist() == [rows - 1, cols - 1]


def test_the_timed_step_is_the_trainers_step_of_the_classification_objective(workload_path):
    from navit_seq.train import classification, loop

    workload = train_step.load_workload(workload_path)
    images, labels = train_step.random_images(workload), train_step.random_labels(workload)
    batch = train_step.pack_workload(images, labels, workload)
    assert set(batch) == set(classification.BATCH_KEYS)  # what goes to the device, no more
    config = train_step.trainer_config(workload, batch["segment_ids"].shape[0], "xla")
    objective = train_step.workload_objective(config, batch)
    trainer = loop.Trainer(config, objective)
    state, metrics = trainer.train_step(trainer.init_state(), trainer.global_batch(batch))
    assert int(state.step) == 1
    assert loop.compute_metrics(metrics)["images_per_step"] == len(images)


def test_flop_count_matches_a_hand_count_for_one_block():
    shape = flops.ModelShape(width=2, depth=1, mlp_dim=4, num_classes=3, patch_dim=5)
    # Per token: embed 2*5*2=20; block 2*(3*4+4+2*2*4)=64; MAP keys/values 2*2*4=16 -> 100.
    # Attention: 2 rows * 4 * 4 query-key pairs * 2 * 2 * width 2 = 256.
    # Head: probe query 2*2*2=8 once; per slot 2*(4+16+6)=52 for 2 rows * 2 slots; every
    # slot scores and averages its whole row: 2*2*(4 slots*4 keys)*2=128.
    forward = 8 * 100 + 256 + 8 + 4 * 52 + 128
    assert flops.packed_step_flops(shape, num_rows=2, seq_len=4, max_examples_per_seq=2) == (
        3 * forward
    )


def test_segment_blocked_attention_counts_only_the_given_query_key_pairs():
    shape = flops.ModelShape(width=2, depth=1, mlp_dim=4, num_classes=3, patch_dim=5)
    full = flops.packed_step_flops(shape, num_rows=2, seq_len=4, max_examples_per_seq=2)
    # Images of 3 and 1 tokens in row 0, 4 in row 1: 9 + 1 + 16 = 26 pairs instead of 32;
    # each pair costs 2 * 2 * width 2 = 8 forward FLOPs.
    blocked = flops.packed_step_flops(shape, 2, 4, 2, query_key_pairs=26)
    assert full - blocked == 3 * (32 - 26) * 8


def test_useful_flops_count_each_image_alone():
    shape = flops.ModelShape(width=2, depth=1, mlp_dim=4, num_classes=3, patch_dim=5)
    # 3 + 1 tokens: per-token 4*100, attention (9 + 1) pairs * 8, probe 8, 2 slots * 52, and
    # each slot over its own 3 or 1 tokens 4 * 8.
    assert flops.useful_step_flops(shape, [3, 1]) == 3 * (400 + 80 + 8 + 104 + 32)


def test_workload_with_an_image_not_in_whole_patches_is_refused(tmp_path):
    bad = {**TINY_WORKLOAD, "images": [[8, 6]]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"\(8, 6\) is not a multiple of patch_size=4"):
        train_step.load_workload(path)
