"""Quickstart: multi-label classification (which shape classes occur) on the bundled scenes.

A tiny NaViT trained for a few minutes on 2 CPU cores:
    python -m navit_seq.main --config configs/quickstart.py --workdir workdirs/quickstart
Arguments (`configs/quickstart.py:steps=50`): `steps` overrides num_train_steps.
"""

import ml_collections

from navit_seq import config_common
from navit_seq.models.navit import default_model_config
from navit_seq.pipeline import default_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = config_common.recipe_options(arg, known=("steps",))
    config = config_common.header(
        "classification",  # navit_seq.train.classification
        steps=int(options.get("steps", 600)),
        log_every_steps=25,
        eval_every_steps=200,
        checkpoint_every_steps=100,
        keep_checkpoints=3,
    )
    config.loss = "sigmoid_xent"  # NaViT's classification pretraining loss

    patch_size = ml_collections.FieldReference(16)  # data and model: one value
    config.data = default_data_config()
    config.data.name = "scenes"
    config.data.data_dir = "datasets"
    config.data.patch_size = patch_size
    # Small images keep a CPU step short: longer side ~ U(32, 128) -> at most 64 tokens each.
    config.data.resolution.min_side = 32
    config.data.resolution.max_side = 128
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.data.max_examples_per_seq = 8
    config.data.pack_buffer_size = 32
    config.data.eval_max_tokens = 64
    config.data.num_workers = 1
    config.data.task = dict(name="classification", num_classes=0)  # 0: from the dataset

    config.model = default_model_config()
    config.model.variant = "Ti"
    config.model.width = 64  # tiny: a few minutes on 2 CPU cores
    config.model.depth = 2
    config.model.num_heads = 2
    config.model.mlp_dim = 128
    config.model.patch_size = patch_size
    config.model.posemb.max_len = 16  # 16 patches per side covers 256 px
    config.model.num_classes = 0  # 0: the dataset's (data.task.num_classes)
    config.model.head_bias_init = -2.0  # prior ~0.12 per class: a few classes per scene

    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = ((".*head.*", 1e-4), (".*", 1e-4))
    config.optimizer.schedule.kind = "cosine"
    config.optimizer.schedule.warmup_steps = 50

    return config
