"""Pix2Seq-v2 multi-task recipe on COCO (Chen et al. 2022, arXiv 2206.07669), paper scale.

NOT RUNNABLE HERE as it stands (config.runnable_here=False): a ViT-B/16 encoder at ~640 px
and a 6 x 512 decoder over four tasks need an accelerator pod (the mesh below is a TPU v4-128
slice). Build COCO first with `python -m navit_seq.data.build coco`, then on the pod:
    python -m navit_seq.main --config configs/pix2seq_v2_multitask.py \
        --config.runnable_here=True --workdir gs://.../pix2seq_v2
`configs/pix2seq_v2_multitask.py:runlocal` is the same recipe at CPU size on the bundled
scenes (tiny encoder and decoder, 160 px, 64-token rows; `shrink_to_this_machine`), for a
smoke run of every piece here; `configs/pix2seq_scenes.py` is the recipe tuned to learn on a
CPU. Values marked (paper) come from the paper / its reference code; (assumed) are not stated.
"""

import ml_collections

from navit_seq import config_common
from navit_seq.models.pix2seq import default_pix2seq_config
from navit_seq.pipeline import default_data_config
from navit_seq.train.sequence import default_loss_config

PATCH_SIZE = 16
IMAGE_SIDE = 640  # (paper) 640 px images (its 46.5 box AP needs 1024)
ROW_LENGTH = 512  # (assumed) decoder row T: detection of 100 objects needs 5 * 100 + 1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = config_common.recipe_options(arg, known=(), switches=(config_common.RUNLOCAL,))
    config = config_common.header(
        "sequence",  # navit_seq.train.sequence
        steps=300_000,  # (assumed)
        log_every_steps=100,
        eval_every_steps=10_000,
        checkpoint_every_steps=2_000,
        keep_checkpoints=3,
        keep_checkpoint_every_steps=50_000,
        profile_steps=5,
    )
    config.runnable_here = False  # pod recipe; pass --config.runnable_here=True on the pod
    config.loss = default_loss_config()  # (paper reference code) no label smoothing
    # One value each, however many fields hold it; the grid and token budget follow the image
    # side and patch size (an override of either moves them).
    patch_size = ml_collections.FieldReference(PATCH_SIZE)
    image_side = ml_collections.FieldReference(IMAGE_SIDE)
    grid_side = image_side // patch_size  # 40 patches per side
    row_length = ml_collections.FieldReference(ROW_LENGTH)

    config.data = default_data_config()
    config.data.name = "coco2017"  # built with `python -m navit_seq.data.build coco`
    config.data.data_dir = "gs://your-bucket/tensorflow_datasets"
    config.data.patch_size = patch_size
    config.data.resolution.kind = "uniform_side"  # (paper) scale jitter, aspect ratio kept
    config.data.resolution.min_side = image_side // 2
    config.data.resolution.max_side = image_side
    config.data.max_grid_side = grid_side
    config.data.seq_len = grid_side * grid_side  # token budget: one 640 px square per row
    config.data.eval_max_tokens = grid_side * grid_side
    config.data.batch_size = 128  # (assumed)
    config.data.max_examples_per_seq = 4  # smaller images share a row (Patch n' Pack)
    config.data.max_rows_per_seq = 64  # segmentation / keypoints: one row per instance
    config.data.token_drop.kind = "none"
    # (paper) batch mixing: each batch is one task, drawn with these weights (greedy search).
    config.data.tasks = (
        ("detection", 0.1782), ("segmentation", 0.7128), ("captioning", 0.099),
        ("keypoints", 0.01),
    )  # fmt: skip
    config.data.mixing = "batch"
    config.data.task = dict(
        name="detection",  # the options below are shared by the four tasks
        seq_len=row_length,
        num_classes=0,  # 0: the dataset's (80 COCO classes)
        num_bins=1000,  # (paper) coordinate quantization bins
        max_instances=16,  # (assumed) segmentation / keypoint rows per image in training
        object_order="random",  # (paper) detection objects in random order
    )

    config.model = default_pix2seq_config()
    config.model.variant = "B"  # (paper) ViT-B encoder
    config.model.patch_size = patch_size
    config.model.posemb.max_len = 64  # >= GRID_SIDE: room for 1024 px fine-tuning
    config.model.decoder.variant = "S"  # (paper) 6 layers, 512 wide
    config.model.decoder.max_len = row_length
    config.model.decoder.vocab_size = 0  # 0: the tasks' shared vocabulary size
    config.model.dtype = "bfloat16"
    config.model.decoder.dtype = "bfloat16"

    config.optimizer.learning_rate = 1e-4  # (assumed) peak
    config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95  # (paper)
    config.optimizer.weight_decay = ((r".*", 0.05),)  # (paper)
    config.optimizer.schedule.kind = "linear"  # (paper) linear warmup then linear decay
    config.optimizer.schedule.warmup_steps = 10_000  # (assumed)

    # A TPU v4-128 slice (64 chips): 8-way FSDP, 2-way tensor parallel for the vocabulary.
    config.mesh.shape = (-1, 8, 2)
    if config_common.RUNLOCAL in options:
        shrink_to_this_machine(config)
    return config


def shrink_to_this_machine(config: ml_collections.ConfigDict) -> None:
    """`:runlocal`: this recipe at CPU size on the bundled scenes, minutes on 2 cores. Only
    sizes, cadence, data and the mesh change; the tasks, weights, decoding and optimizer
    choices stay the paper's. The tied fields follow the image side and row length."""
    config.runnable_here = True
    config.num_train_steps = 300  # the schedule's decay_steps follows
    config.log_every_steps, config.eval_every_steps = 10, 100
    config.checkpoint_every_steps, config.profile_steps = 100, 0
    config.keep_checkpoint_every_steps = 0
    # The bundled scenes: python -m navit_seq.data.build scenes --data-dir datasets
    config.data.name, config.data.data_dir = "scenes", "datasets"
    config.data.resolution.max_side = 160  # the image side: 10 x 10 patches, 100 tokens a row
    config.data.batch_size, config.data.max_rows_per_seq = 16, 8
    config.data.num_workers = 1
    config.data.task.seq_len = 64  # the row length (decoder.max_len too): keypoints need 40
    config.data.task.num_bins = 64  # 2.5 px at 160 px
    config.data.task.max_instances = 8
    config.model.variant = config.model.decoder.variant = "Ti"
    for tower in (config.model, config.model.decoder):
        tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 96, 2, 3, 192
        tower.dtype = "float32"  # bfloat16 matmuls are emulated, slowly, on most CPUs
    config.model.posemb.max_len = 12  # >= 10 patches per side
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule.warmup_steps = 30
    config.mesh.shape = (-1, 1, 1)  # all local devices on `data`
