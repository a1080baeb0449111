"""NaViT classification on the one-object scenes (`scene_shapes`), where resolution matters.

Twelve shape classes (circle, hexagon, pentagon, star, ...) that blur together at a few pixels,
so accuracy drops when the test resolution falls: the data of the NaViT ablations
(experiments/navit/). A small NaViT trained from scratch on 2 CPU cores in ~10 minutes:
    python -m navit_seq.data.build scenes --variant scene_shapes --data-dir datasets \\
        --train-size 8000 --validation-size 1000 --heldout-size 500 --min-side 64 --max-side 256
    python -m navit_seq.main --config configs/navit_shapes.py --workdir workdirs/shapes
Evaluate at another test resolution (longer side in pixels):
    python -m navit_seq.evaluate --config configs/navit_shapes.py --workdir workdirs/shapes \\
        --config.data.eval_side=32
Arguments (`configs/navit_shapes.py:steps=100`): `steps` overrides num_train_steps.
"""

import ml_collections

from navit_seq import config_common
from navit_seq.models.navit import default_model_config
from navit_seq.pipeline import default_data_config

PATCH_SIZE = 16
MAX_GRID_SIDE = 16  # patches per side: 256 px, the largest stored image
# Test resolution: longer side 128 px (8 patches); the build's images are 64-256 px.
EVAL_SIDE = 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = config_common.recipe_options(arg, known=("steps",))
    config = config_common.header(
        "classification",  # navit_seq.train.classification
        steps=int(options.get("steps", 1500)),
        log_every_steps=50,
        eval_every_steps=500,
        checkpoint_every_steps=500,
        keep_checkpoints=2,
    )
    config.loss = "softmax_xent"  # one labelled object per image
    # One value each, however many fields hold it (an override of one moves them all).
    patch_size = ml_collections.FieldReference(PATCH_SIZE)
    max_grid_side = ml_collections.FieldReference(MAX_GRID_SIDE)

    config.data = default_data_config()
    config.data.name = "scene_shapes"
    config.data.data_dir = "datasets"
    config.data.patch_size = patch_size
    # NaViT's variable resolution: longer side ~ U(48, 192) -> 3..12 patches per side.
    config.data.resolution.kind = "uniform_side"
    config.data.resolution.min_side = 48
    config.data.resolution.max_side = 192
    config.data.seq_len = 256
    config.data.batch_size = 16
    config.data.max_examples_per_seq = 16
    config.data.pack_buffer_size = 64
    config.data.eval_side = EVAL_SIDE
    config.data.eval_max_tokens = 256
    config.data.max_grid_side = max_grid_side
    config.data.num_workers = 1
    config.data.augment.flip_left_right = 0.5
    config.data.task = dict(name="classification", num_classes=0)  # 0: from the dataset

    config.model = default_model_config()
    config.model.variant = "Ti"
    config.model.width = 128
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 256
    config.model.patch_size = patch_size
    config.model.posemb.max_len = max_grid_side
    # Sinusoidal: 400-step probe precision@1 0.251 vs 0.183 learned (README, "Classification").
    config.model.posemb.embedding = "sinusoidal"
    config.model.posemb.out_of_range = "clamp"  # max_grid_side keeps positions in range
    config.model.num_classes = 0  # 0: the dataset's (data.task.num_classes)

    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = ((".*", 1e-4),)
    config.optimizer.schedule.kind = "cosine"
    config.optimizer.schedule.warmup_steps = 100
    return config
