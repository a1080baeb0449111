"""Test-wide set-up: 8 simulated CPU devices (must happen before JAX starts its backend)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Commands run by tests (subprocesses) compile without JAX's persistent cache: no test reads or
# fills the user's cache (tests/test_cli.py turns it on where it tests it).
os.environ.setdefault("NAVIT_SEQ_COMPILATION_CACHE", "")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")


import pytest  # noqa: E402

# The tiny scene dataset every test may share: built once per test session (a few seconds).
SCENES_TEST_SIZES = {"train_size": 24, "validation_size": 8, "heldout_size": 8}
SCENES_TEST_SIDES = {"min_side": 48, "max_side": 320}


@pytest.fixture(scope="session")
def scenes_data_dir(tmp_path_factory) -> str:
    """TFDS data_dir holding dataset "scenes" (24 train / 8 validation / 8 heldout, sides 48-320).

    Read it with `navit_seq.data.sources.data_source("scenes", split, scenes_data_dir)`; its
    tokenizer is `sources.sentencepiece_model("scenes", scenes_data_dir)`.
    """
    from navit_seq.data.build import build_scenes

    data_dir = str(tmp_path_factory.mktemp("scenes_data"))
    build_scenes(data_dir, num_workers=1, **SCENES_TEST_SIZES, **SCENES_TEST_SIDES)
    return data_dir


# A tiny scene_textures dataset (configs/navit_textures.py's data), built once per test session.
TEXTURES_TEST_OPTIONS = {"train_size": 24, "validation_size": 8, "heldout_size": 4,
                         "min_side": 128, "max_side": 192}  # fmt: skip


@pytest.fixture(scope="session")
def textures_data_dir(tmp_path_factory) -> str:
    """TFDS data_dir holding dataset "scene_textures" (24 train / 8 validation / 4 heldout)."""
    from navit_seq.data.build import build_scenes

    data_dir = str(tmp_path_factory.mktemp("textures_data"))
    build_scenes(data_dir, num_workers=1, variant="scene_textures", **TEXTURES_TEST_OPTIONS)
    return data_dir
