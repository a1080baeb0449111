"""Pix2Seq-v2 multi-task recipe on COCO (Chen et al. 2022, arXiv 2206.07669), paper scale.

NOT RUNNABLE HERE (config.runnable_here=False): a ViT-B/16 encoder at ~640 px and a 6 x 512
decoder over four tasks need an accelerator pod (the mesh below is a TPU v4-128 slice). Build
COCO first with `python -m navit_seq.data.build coco`, then on the pod:
    python -m navit_seq.main --config configs/pix2seq_v2_multitask.py \
        --config.runnable_here=True --workdir gs://.../pix2seq_v2
The same recipe shrunk to run on a CPU in minutes is `configs/pix2seq_scenes.py`.
Values marked (paper) come from the paper / its reference code; (assumed) are not stated.
"""

import ml_collections

from navit_seq import config_utils
from navit_seq.models.pix2seq import default_pix2seq_config
from navit_seq.pipeline import default_data_config
from navit_seq.sharding import default_distributed_config, default_mesh_config
from navit_seq.train.optimizer import default_optimizer_config
from navit_seq.train.sequence import default_loss_config

PATCH_SIZE = 16
IMAGE_SIDE = 640  # (paper) 640 px images (its 46.5 box AP needs 1024)
GRID_SIDE = IMAGE_SIDE // PATCH_SIZE  # 40 patches per side
ROW_LENGTH = 512  # (assumed) decoder row T: detection of 100 objects needs 5 * 100 + 1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config_utils.recipe_options(arg, known=())  # takes no arguments: any is an error
    config = config_utils.loop_config(
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

    config.data = default_data_config()
    config.data.name = "coco2017"  # built with `python -m navit_seq.data.build coco`
    config.data.data_dir = "gs://your-bucket/tensorflow_datasets"
    config.data.patch_size = PATCH_SIZE
    config.data.resolution.kind = "uniform_side"  # (paper) scale jitter, aspect ratio kept
    config.data.resolution.min_side = IMAGE_SIDE // 2
    config.data.resolution.max_side = IMAGE_SIDE
    config.data.max_grid_side = GRID_SIDE
    config.data.seq_len = GRID_SIDE * GRID_SIDE  # token budget: one 640 px square per row
    config.data.eval_max_tokens = GRID_SIDE * GRID_SIDE
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
        seq_len=ROW_LENGTH,
        num_classes=0,  # 0: the dataset's (80 COCO classes)
        num_bins=1000,  # (paper) coordinate quantization bins
        max_instances=16,  # (assumed) segmentation / keypoint rows per image in training
        object_order="random",  # (paper) detection objects in random order
    )

    config.model = default_pix2seq_config()
    config.model.variant = "B"  # (paper) ViT-B encoder
    config.model.patch_size = PATCH_SIZE
    config.model.posemb.max_len = 64  # >= GRID_SIDE: room for 1024 px fine-tuning
    config.model.decoder.variant = "S"  # (paper) 6 layers, 512 wide
    config.model.decoder.max_len = ROW_LENGTH
    config.model.decoder.vocab_size = 0  # 0: the tasks' shared vocabulary size
    config.model.dtype = "bfloat16"
    config.model.decoder.dtype = "bfloat16"

    config.optimizer = default_optimizer_config()
    config.optimizer.learning_rate = 1e-4  # (assumed) peak
    config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95  # (paper)
    config.optimizer.weight_decay = ((r".*", 0.05),)  # (paper)
    config.optimizer.schedule.kind = "linear"  # (paper) linear warmup then linear decay
    config.optimizer.schedule.warmup_steps = 10_000  # (assumed)
    config.optimizer.schedule.decay_steps = config.get_ref("num_train_steps")

    # A TPU v4-128 slice (64 chips): 8-way FSDP, 2-way tensor parallel for the vocabulary.
    config.mesh = default_mesh_config()
    config.mesh.shape = (-1, 8, 2)
    config.distributed = default_distributed_config()  # multi-host: usually auto-detected
    return config
