"""Command-line config loading shared by main / evaluate / export.

`--config configs/<recipe>.py:<arg>` calls the file's `get_config(arg)`; `--config.a.b=value`
overrides a field with ml_collections' type checks (a wrong type names the flag). The config is
locked, so an unknown key is an error; we re-raise that as one line naming the full key. A
recipe's own error (a bad argument, a missing file) is reported as one line too (`navit_seq.cli`).
"""

import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from navit_seq import cli

REQUIRED_FIELDS = (
    "seed",
    "num_train_steps",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "mesh",
    "model",
    "data",
    "optimizer",
)

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe: configs/<recipe>.py[:arg]; override fields with --config.a.b=v.",
    lock_config=True,
)  # fmt: skip
WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results (required)."
)
STEP = flags.DEFINE_integer("step", None, "evaluate/export: checkpoint step (default: latest).")
COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", cli.default_compilation_cache_dir(),
    "JAX's persistent compilation cache: a second run of the same programs loads them instead "
    f"of compiling ('' = off; the default comes from ${cli.CACHE_ENV}).",
)  # fmt: skip


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path.py[:arg]` -> `get_config(arg)` (without flag overrides)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {spec}: no file {path!r}; recipes live in configs/.")
    module_spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_override(config: ml_collections.ConfigDict, argv: Sequence[str]) -> str | None:
    """The first `--config.a.b=v` whose key `a.b` is not in `config`, with the valid keys."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        node = config
        for depth, part in enumerate(key.split(".")):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join(key.split(".")[:depth]) or "config"
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return f"unknown config key {key!r} ({part!r} is not in {parent}; it has {known})"
            node = node[part]
    return None


def config_spec(argv: Sequence[str]) -> str | None:
    """The `--config` value of a command line (`path.py[:arg]`), if there is one."""
    return next(
        (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"),
        next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None),
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with an unknown config key or a failing recipe reported as one line."""
    spec = config_spec(argv)
    path = spec.partition(":")[0] if spec else None
    if path and not Path(path).is_file():  # ml_collections would defer this to a later access
        raise FileNotFoundError(f"--config {spec}: no file {path!r}; recipes live in configs/.")
    try:
        remaining = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as error:
        # ml_collections wraps the recipe's own errors in a message holding their traceback:
        # loading the recipe again raises them as they are (one line from `navit_seq.cli`).
        reason = unknown_override(load_config_file(spec), argv) if spec else None
        if reason:
            sys.exit(f"error: {reason}. Fix or remove the override.")
        sys.exit(f"error: {cli.one_line(error)}; pass --help to see the flags.")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    return remaining


def validated_config() -> ml_collections.ConfigDict:
    """The parsed --config, checked for the fields every training recipe must have."""
    config = CONFIG.value
    if config is None:
        sys.exit("error: --config is required, e.g. --config configs/quickstart.py")
    missing = [field for field in REQUIRED_FIELDS if field not in config]
    if missing:
        sys.exit(f"error: the recipe lacks required fields {missing}.")
    if config.get("runnable_here") is False:
        sys.exit(
            "error: this is a paper-scale TPU/GPU pod recipe (config.runnable_here=False), not "
            "runnable on this machine. On a pod, pass --config.runnable_here=True."
        )
    return config


def required_workdir() -> Path:
    if not WORKDIR.value:
        sys.exit("error: --workdir is required (where checkpoints and metrics live).")
    return Path(WORKDIR.value)


def save_config(config: ml_collections.ConfigDict, path: Path) -> None:
    """The resolved config as JSON (what export ships; what a reader checks a run against)."""
    path.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2) + "\n")


def check_same_recipe(
    config: ml_collections.ConfigDict,
    path: Path,
    *,
    use: str = "resuming it",
    fix: str = "Pass a new --workdir, or delete that one to start over.",
) -> None:
    """Refuses to resume (or, with `use`/`fix` saying so, start from) a workdir whose saved
    run (`path`, its config.json) trained another trainer or model: restoring its checkpoint
    would fail deep inside Orbax instead."""
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    current = json.loads(config.to_json_best_effort())
    differing = [key for key in ("trainer", "model") if saved.get(key) != current.get(key)]
    if differing:
        sys.exit(
            f"error: {path.parent} holds a run with a different {' and '.join(differing)} "
            f"(see {path}); {use} with this recipe cannot work. {fix}"
        )


def run(main: Callable[[list[str]], None]) -> None:
    """`app.run` with the config-aware flag parser, one-line errors (`navit_seq.cli`) and
    JAX's persistent compilation cache at --compilation_cache_dir."""

    def parse(argv: list[str]) -> list[str]:
        remaining = parse_flags(argv)
        cli.enable_compilation_cache(COMPILATION_CACHE.value)
        return remaining

    cli.run_absl(main, flags_parser=parse)
