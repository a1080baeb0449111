"""The header every recipe shares: loop cadence, checkpoints, mesh, launch, optimizer defaults.

A recipe (`configs/<recipe>.py`) starts from `header(trainer, ...)` and adds its `data`,
`model` and `loss` sections; `recipe_options` reads its argument, big_vision style
(`configs/pix2seq_v2_multitask.py:runlocal`, `configs/quickstart.py:steps=50`). Values that
must agree are one `ml_collections.FieldReference` assigned to every field that holds them
(e.g. `data.patch_size` and `model.patch_size`), so an override of one
(`--config.data.patch_size=8`) moves the others; the header ties the schedule's `decay_steps`
to `num_train_steps` the same way. Only ml_collections is imported here: reading the header
never starts JAX.
"""

import importlib.util
import os
import pathlib
import types
from collections.abc import Sequence

import ml_collections

RUNLOCAL = "runlocal"  # the recipe argument that shrinks a pod recipe to this machine


def recipe_options(
    arg: str | None, *, known: Sequence[str], switches: Sequence[str] = ()
) -> dict[str, str]:
    """A recipe's argument (`configs/x.py:runlocal,steps=50`) as {name: text}.

    `known`: the `name=value` names the recipe reads; `switches`: the bare names it reads
    (e.g. RUNLOCAL), given as {name: ""}. Any other name (a typo such as `stpes`) is an error
    listing them, never silently ignored.
    """
    options = {}
    for item in arg.split(",") if arg else []:
        name, equals, value = item.partition("=")
        if not equals and name in switches:
            options[name] = ""
            continue
        if not equals or not name:
            raise ValueError(
                f"recipe argument {item!r} (in {arg!r}) is not name=value; write e.g. "
                "configs/quickstart.py:steps=50 (pairs separated by commas)."
            )
        if name not in known:
            names = [*known, *switches]
            takes = f"it takes {', '.join(names)}" if names else "it takes none"
            raise ValueError(
                f"recipe argument {name!r} (in {arg!r}) is not one this recipe reads; {takes}. "
                "Fix the name, or set any field with --config.a.b=value."
            )
        if name in options:
            raise ValueError(f"recipe argument {name!r} is given twice in {arg!r}; keep one.")
        options[name] = value
    return options


def header(
    trainer: str,
    *,
    steps: int,
    log_every_steps: int,
    eval_every_steps: int,
    checkpoint_every_steps: int,
    keep_checkpoints: int,
    keep_checkpoint_every_steps: int = 0,
    profile_steps: int = 0,
) -> ml_collections.ConfigDict:
    """A recipe's ConfigDict with the fields the shared training loop reads.

    `trainer`: navit_seq.train.<trainer> (or a module path); `num_train_steps` is a
    FieldReference that the optimizer schedule's `decay_steps` follows, also under
    --config.num_train_steps overrides; `keep_checkpoint_every_steps` 0 keeps only the last
    `keep_checkpoints`; `profile_steps` > 0 traces that many steps after step 10;
    `log_batch_fingerprint` logs a CRC32 of each logged batch (resume checks); `init_from`
    names a workdir whose latest checkpoint's parameters start a run that has no checkpoint of
    its own (staged training, fine-tuning; "" = none). Also `mesh`, `distributed` and
    `optimizer` at their defaults (below), for the recipe to adjust.
    """
    config = ml_collections.ConfigDict()
    config.trainer = trainer
    config.seed = 0
    config.num_train_steps = ml_collections.FieldReference(steps)
    config.log_every_steps = log_every_steps
    config.eval_every_steps = eval_every_steps
    config.checkpoint_every_steps = checkpoint_every_steps
    config.keep_checkpoints = keep_checkpoints
    config.keep_checkpoint_every_steps = keep_checkpoint_every_steps
    config.profile_steps = profile_steps
    config.log_batch_fingerprint = False
    config.init_from = ""
    config.mesh = default_mesh_config()  # all local devices on `data`
    config.distributed = default_distributed_config()  # multi-host: usually auto-detected
    config.optimizer = default_optimizer_config()
    config.optimizer.schedule.decay_steps = config.get_ref("num_train_steps")
    return config


def default_mesh_config() -> ml_collections.ConfigDict:
    """`config.mesh` every recipe starts from: all devices on `data`, GSPMD-style rules.

    `shape` gives one size per axis in `axis_names` (-1 = the remaining devices); `rules` map
    logical axis names to mesh axes (unlisted names are replicated). FSDP shards the model
    width over `fsdp`; tensor parallelism shards MLP, heads and classes over `tensor`.
    """
    return ml_collections.ConfigDict(
        dict(
            axis_names=("data", "fsdp", "tensor"),
            shape=(-1, 1, 1),
            num_devices=-1,  # -1: every device; N: the first N (e.g. 1 for a single-device run)
            rules=(
                ("act_batch", ("data", "fsdp")),
                ("embed", "fsdp"),
                ("mlp", "tensor"),
                ("heads", "tensor"),
                ("classes", "tensor"),
                ("vocab", "tensor"),
                ("act_mlp", "tensor"),
                ("act_heads", "tensor"),
            ),
        )
    )


def default_distributed_config() -> ml_collections.ConfigDict:
    """`config.distributed`: set only to launch multi-host by hand (else auto-detected)."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(
        dict(
            coordinator_address=placeholder(str),  # "host:port" of process 0
            num_processes=placeholder(int),
            process_id=placeholder(int),
        )
    )


def default_optimizer_config() -> ml_collections.ConfigDict:
    """`config.optimizer` every recipe starts from (and overrides); navit_seq.train.optimizer
    builds it."""
    return ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-3,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            # (regex, decay) pairs, first match wins; e.g. NaViT: head 3.0, body 0.03.
            weight_decay=((".*", 1e-4),),
            frozen=(),  # regexes of parameters that are not trained
            grad_clip_norm=1.0,  # 0 = no clipping
            grad_accum_steps=1,  # micro-batches per step (the batch is split, one update)
            ema_decay=0.0,  # 0 = no EMA of parameters
            schedule=dict(
                kind="cosine",
                warmup_steps=0,
                decay_steps=1000,  # usually num_train_steps
                end_factor=0.0,  # cosine/linear: final lr = end_factor * peak
                timescale=10_000,  # rsqrt
                cooldown_steps=0,  # rsqrt
            ),
        )
    )


def load_recipe(path: str | os.PathLike) -> types.ModuleType:
    """The recipe file at `path` as a module, so one recipe can build on another's
    `get_config` (configs/ is not a package: ml_collections loads recipes by path)."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"navit_seq_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
