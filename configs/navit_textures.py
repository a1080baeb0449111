"""NaViT classification on the one-object texture scenes (`scene_textures`): resolution matters.

Twelve texture classes (stripes in four orientations, checks and diamonds, each fine or coarse;
scene_render.TEXTURE_NAMES). A fine period is 1/32 of the longer side: 4 px at the evaluation
side of 128 px, where one 16-px patch holds four periods, and 1 px at 32 px, where the resize
averages it to the texture's mean colour, so the six fine classes become one. A small NaViT
trained from scratch on 2 CPU cores, 1000 steps in ~9 minutes, reaches top-1 0.98-0.99 at 128 px
and 0.21-0.23 at 32 px (README, "NaViT encoder", two seeds):
    python -m navit_seq.data.build scenes --variant scene_textures --data-dir datasets \\
        --train-size 8000 --validation-size 1000 --heldout-size 500 --min-side 128 --max-side 256
    python -m navit_seq.main --config configs/navit_textures.py --workdir workdirs/textures
Evaluate at another test resolution (longer side in pixels):
    python -m navit_seq.evaluate --config configs/navit_textures.py --workdir workdirs/textures \\
        --config.data.eval_side=32 --results_file=eval_side32.json
Arguments (`configs/navit_textures.py:steps=100`): `steps` overrides num_train_steps.
"""

import ml_collections

from navit_seq import config_common
from navit_seq.models.navit import default_model_config
from navit_seq.pipeline import default_data_config

PATCH_SIZE = 16
MAX_GRID_SIDE = 16  # patches per side: 256 px, the largest stored image
# Test resolution: longer side 128 px (8 patches); the build's images are 128-256 px.
EVAL_SIDE = 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = config_common.recipe_options(arg, known=("steps",))
    config = config_common.header(
        "classification",  # navit_seq.train.classification
        steps=int(options.get("steps", 1000)),
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
    config.data.name = "scene_textures"
    config.data.data_dir = "datasets"
    config.data.patch_size = patch_size
    # NaViT's variable resolution: longer side ~ U(32, 192) -> 2..12 patches per side, so the
    # quarter of the test side (32 px) is seen in training: there a fine texture is gone and a
    # coarse one (4 px) must be told from the fine ones at 128 px by its angle.
    config.data.resolution.kind = "uniform_side"
    config.data.resolution.min_side = 32
    config.data.resolution.max_side = 192
    config.data.seq_len = 256
    config.data.batch_size = 16
    config.data.max_examples_per_seq = 16
    config.data.pack_buffer_size = 64
    config.data.eval_side = EVAL_SIDE
    config.data.eval_max_tokens = 256
    config.data.max_grid_side = max_grid_side
    config.data.num_workers = 1
    # No flips: a left-right flip turns rising stripes into falling ones, another class.
    config.data.augment.flip_left_right = 0.0
    config.data.task = dict(name="classification", num_classes=0)  # 0: from the dataset

    config.model = default_model_config()
    config.model.variant = "Ti"
    config.model.width = 128
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 256
    config.model.patch_size = patch_size
    config.model.posemb.max_len = max_grid_side
    config.model.posemb.embedding = "sinusoidal"
    config.model.posemb.out_of_range = "clamp"  # max_grid_side keeps positions in range
    config.model.num_classes = 0  # 0: the dataset's (data.task.num_classes)

    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = ((".*", 1e-4),)
    config.optimizer.schedule.kind = "cosine"
    config.optimizer.schedule.warmup_steps = 100
    return config
