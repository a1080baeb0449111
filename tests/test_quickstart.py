"""`python -m navit_seq.quickstart`: the stages it runs (recorded, not run)."""

from navit_seq import quickstart


def stage_commands(monkeypatch, tmp_path, *argv):
    commands = []
    monkeypatch.setattr(quickstart, "run_stage", lambda title, command: commands.append(command))
    quickstart.main(["--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "w"), *argv])
    return commands


def test_seed_reaches_both_training_stages_and_nothing_else(monkeypatch, tmp_path):
    default = stage_commands(monkeypatch, tmp_path)
    seeded = stage_commands(monkeypatch, tmp_path, "--seed", "1")
    flags = ["--config.seed=1", "--config.data.seed=1"]
    build, stage1, stage2, evaluate, plot = seeded
    assert stage1 == default[1] + flags and stage2 == default[2] + flags
    assert (build, evaluate, plot) == (default[0], default[3], default[4])
    assert not any(".seed=" in part for command in default for part in command)
