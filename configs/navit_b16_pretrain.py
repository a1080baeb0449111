"""NaViT-B/16 classification pretraining, paper-scale (Dehghani et al. 2023, arXiv 2307.06304).

NOT RUNNABLE HERE: written for a TPU/GPU pod (JFT-scale data, thousands of images per step).
It documents the paper's hyper-parameters in this codebase's config system; `runnable_here`
stops `navit_seq.main` on a workstation. On a pod (see README "multi-host"):
    python -m navit_seq.main --config configs/navit_b16_pretrain.py --workdir gs://.../run \\
        --config.runnable_here=True --config.data.name=<your TFDS dataset>
`configs/navit_b16_pretrain.py:runlocal` is the same recipe at CPU size on the bundled scenes
(`shrink_to_this_machine`): a smoke run of the paper's choices in minutes on 2 cores.
Values marked (paper) come from the paper; (assumed) are standard big_vision ViT-B/16 choices
the paper does not state in the digest this project works from.
"""

import ml_collections

from navit_seq import config_common
from navit_seq.models.navit import default_model_config
from navit_seq.pipeline import default_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = config_common.recipe_options(arg, known=(), switches=(config_common.RUNLOCAL,))
    config = config_common.header(
        "classification",
        steps=500_000,  # (assumed)
        log_every_steps=100,
        eval_every_steps=5_000,
        checkpoint_every_steps=2_000,
        keep_checkpoints=3,
        keep_checkpoint_every_steps=50_000,
        profile_steps=5,
    )
    config.runnable_here = False  # a TPU/GPU pod recipe: see the module docstring
    config.loss = "sigmoid_xent"  # (paper) sigmoid cross-entropy, JFT multi-label

    patch_size = ml_collections.FieldReference(16)  # data and model: one value
    config.data = default_data_config()
    config.data.name = "jft"  # not public: set --config.data.name to a TFDS dataset you have
    config.data.data_dir = "gs://your-bucket/tensorflow_datasets"
    config.data.patch_size = patch_size
    config.data.seq_len = 256  # (paper) Table 2: L = 256 holds ~4.9 images at B/16
    config.data.batch_size = 4096  # (assumed) global rows of 256 tokens
    config.data.max_examples_per_seq = 8  # head-room over the ~4.9 images per row
    config.data.pack_buffer_size = 256
    config.data.resolution.kind = "uniform_side"  # (paper) side ~ U(64, 256)
    config.data.resolution.min_side = 64
    config.data.resolution.max_side = 256
    config.data.eval_max_tokens = 256  # (paper) 256 tokens at inference is within 0.3% of best
    config.data.num_workers = 16
    config.data.token_drop.kind = "none"  # token dropping is an ablation; see token_drop.py
    config.data.task = dict(name="classification", num_classes=0)  # 0: from the dataset

    config.model = default_model_config()
    config.model.variant = "B"  # ViT-B: width 768, depth 12, 12 heads, MLP 3072
    config.model.patch_size = patch_size
    config.model.qk_norm = True  # (paper) query-key normalization
    config.model.use_bias = False  # (paper) no biases
    config.model.pooling = "map"  # (paper) attention pooling head
    config.model.posemb.kind = "factorized"  # (paper) factorized, summed, learned
    config.model.posemb.combine = "sum"
    config.model.posemb.embedding = "learned"
    config.model.num_classes = 0  # the dataset's
    config.model.head_bias_init = -10.0  # (assumed) big_vision's prior for sigmoid over 30k classes
    config.model.dtype = "bfloat16"  # activations; parameters stay float32

    config.optimizer.learning_rate = 8e-4  # (paper) peak
    config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999  # (assumed)
    # (paper) weight decay 3.0 on the head, 0.03 on the body (optax: multiplied by the lr).
    config.optimizer.weight_decay = ((r"head/.*", 3.0), (r".*", 0.03))
    config.optimizer.grad_clip_norm = 1.0  # (assumed)
    config.optimizer.schedule.kind = "rsqrt"  # (paper) reciprocal square root
    config.optimizer.schedule.warmup_steps = 10_000  # (assumed)
    config.optimizer.schedule.timescale = 10_000  # (assumed)
    config.optimizer.schedule.cooldown_steps = 50_000  # (assumed) linear cooldown at the end

    # A TPU v4-256 slice (128 chips): 16-way FSDP shards width and optimizer state, the rest
    # is data parallel. ViT-B fits without tensor parallelism.
    config.mesh.shape = (-1, 16, 1)
    if config_common.RUNLOCAL in options:
        shrink_to_this_machine(config)
    return config


def shrink_to_this_machine(config: ml_collections.ConfigDict) -> None:
    """`:runlocal`: this recipe at CPU size on the bundled scenes, minutes on 2 cores. Only
    sizes, cadence, data, schedule lengths and the mesh change; the model's and the loss's
    choices (qk-norm, no biases, MAP head, factorized posemb, sigmoid CE) stay the paper's."""
    config.runnable_here = True
    config.num_train_steps = 300  # the schedule's decay_steps follows
    config.log_every_steps, config.eval_every_steps = 25, 100
    config.checkpoint_every_steps, config.profile_steps = 100, 0
    config.keep_checkpoint_every_steps = 0
    # The bundled scenes: python -m navit_seq.data.build scenes --data-dir datasets
    config.data.name, config.data.data_dir = "scenes", "datasets"
    config.data.resolution.min_side, config.data.resolution.max_side = 32, 128
    config.data.seq_len, config.data.eval_max_tokens = 128, 64
    config.data.batch_size, config.data.pack_buffer_size = 16, 32
    config.data.num_workers = 1
    config.model.variant = "Ti"
    config.model.width, config.model.depth, config.model.num_heads = 64, 2, 2
    config.model.mlp_dim = 128
    config.model.head_bias_init = -2.0  # a dozen classes, a few per scene: prior ~0.12
    config.model.dtype = "float32"  # bfloat16 matmuls are emulated, slowly, on most CPUs
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = ((r".*", 1e-4),)  # the paper's 3.0 head decay is for JFT
    config.optimizer.schedule.warmup_steps = 30
    config.optimizer.schedule.timescale = 30
    config.optimizer.schedule.cooldown_steps = 30
    config.mesh.shape = (-1, 1, 1)  # all local devices on `data`
