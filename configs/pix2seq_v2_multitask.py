"""Pix2Seq-v2 multi-task recipe (Chen et al. 2022, arXiv 2206.07669): a PLACEHOLDER.

NOT RUNNABLE HERE, and not yet runnable anywhere: the sequence decoder and its trainer
(`navit_seq.train.pix2seq`) are filled in by the Pix2Seq-v2 issue. This file fixes the
paper's hyper-parameters and the pod mesh so that issue only has to wire them up.
Values marked (paper) come from the paper / its reference code; (assumed) are not stated.
"""

import ml_collections

from navit_seq.data.pipeline import default_data_config
from navit_seq.models.navit import default_model_config
from navit_seq.sharding import default_distributed_config, default_mesh_config
from navit_seq.train.optimizer import default_optimizer_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.runnable_here = False  # placeholder + pod recipe
    config.trainer = "pix2seq"  # to be written: navit_seq.train.pix2seq
    config.seed = 0
    config.num_train_steps = ml_collections.FieldReference(300_000)  # (assumed)
    config.log_every_steps = 100
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 2_000
    config.keep_checkpoints = 3
    config.keep_checkpoint_every_steps = 50_000
    config.profile_steps = 5
    config.log_batch_fingerprint = False

    patch_size = 16
    config.data = default_data_config()
    config.data.name = "coco2017"  # built with `python -m navit_seq.data.build coco`
    config.data.data_dir = "gs://your-bucket/tensorflow_datasets"
    config.data.patch_size = patch_size
    config.data.resolution.kind = "uniform_side"  # (paper) scale jitter, aspect ratio kept
    config.data.resolution.min_side = 320
    config.data.resolution.max_side = 640  # (paper) 640 px images (46.5 AP needs 1024)
    config.data.seq_len = 1600  # (640 / 16)^2 tokens: one 640 px image per row at most
    config.data.batch_size = 128  # (assumed)
    config.data.max_examples_per_seq = 4
    config.data.eval_max_tokens = 1600
    config.data.token_drop.kind = "none"
    # (paper) batch mixing: each batch draws one task with these weights (greedy search).
    config.data.task = dict(
        name="multitask",  # to be registered in navit_seq.tasks by the Pix2Seq-v2 issue
        weights=dict(detection=0.1782, instance_segmentation=0.7128, captioning=0.099,
                     keypoints=0.01),
        max_seq_len=512,  # (assumed) decoder rows
    )  # fmt: skip

    config.model = default_model_config()
    config.model.variant = "B"  # (paper) ViT-B encoder
    config.model.patch_size = patch_size
    config.model.decoder = dict(
        depth=6, width=512, num_heads=16, mlp_dim=2048,  # (paper) 6 layers, 512 wide
        vocab_size=35_000,  # (paper) shared vocabulary (classes, coordinates, text)
        coord_bins=1000,  # (paper) coordinate quantization bins
    )  # fmt: skip
    config.model.dtype = "bfloat16"

    config.optimizer = default_optimizer_config()
    config.optimizer.learning_rate = 1e-4  # (assumed) peak
    config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95  # (paper)
    config.optimizer.weight_decay = ((r".*", 0.05),)  # (paper)
    config.optimizer.schedule.kind = "linear"  # (paper) linear warmup then linear decay
    config.optimizer.schedule.warmup_steps = 10_000  # (assumed)
    config.optimizer.schedule.decay_steps = config.get_ref("num_train_steps")

    # A TPU v4-128 slice (64 chips): 8-way FSDP, 2-way tensor parallel for the 35k vocabulary.
    config.mesh = default_mesh_config()
    config.mesh.shape = (-1, 8, 2)
    config.distributed = default_distributed_config()  # multi-host: usually auto-detected
    return config
