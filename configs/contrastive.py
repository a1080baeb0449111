"""Image-text contrastive pretraining (NaViT §3.5 with SigLIP's sigmoid loss) on scene captions.

Tiny towers that train for a few minutes on 2 CPU cores:
    python -m navit_seq.main --config configs/contrastive.py --workdir workdirs/contrastive
Arguments (`configs/contrastive.py:steps=50,loss=softmax,data=NAME`): `steps` overrides
num_train_steps; `loss` picks sigmoid (SigLIP) or softmax (CLIP); `data` names another TFDS
dataset with captions in data_dir (e.g. one built by `navit_seq.data.builders.image_text`).
Eval reports the loss and image<->text retrieval recall@1/5/10 on the validation split.
"""

import ml_collections

from navit_seq import config_common
from navit_seq.models.two_tower import default_two_tower_config
from navit_seq.pipeline import default_data_config
from navit_seq.train.contrastive import default_loss_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = config_common.recipe_options(arg, known=("steps", "loss", "data"))
    config = config_common.header(
        "contrastive",  # navit_seq.train.contrastive
        steps=int(options.get("steps", 600)),
        log_every_steps=25,
        eval_every_steps=200,
        checkpoint_every_steps=100,
        keep_checkpoints=3,
    )
    config.loss = default_loss_config()
    config.loss.name = options.get("loss", "sigmoid")

    # One value each, however many fields hold it (an override of one moves them all).
    patch_size = ml_collections.FieldReference(16)
    # NaViT's contrastive runs cut captions at 24 tokens: the text tower's position table.
    max_text_len = ml_collections.FieldReference(24)
    config.data = default_data_config()
    config.data.name = options.get("data", "scenes")
    config.data.data_dir = "datasets"
    config.data.patch_size = patch_size
    config.data.resolution.min_side = 32
    config.data.resolution.max_side = 128
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.data.max_examples_per_seq = 8
    config.data.pack_buffer_size = 32
    config.data.eval_max_tokens = 64
    config.data.num_workers = 1
    # A row holds up to 4 full captions (the packer also waits for text room, so rows
    # average fewer images than max_examples).
    config.data.task = dict(name="image_text", max_text_len=max_text_len)
    config.data.text_seq_len = 96

    config.model = default_two_tower_config(config.loss.name)
    for tower in (config.model.image, config.model.text):
        tower.variant = "Ti"
        tower.width = 64  # tiny: a few minutes on 2 CPU cores
        tower.depth = 2
        tower.num_heads = 2
        tower.mlp_dim = 128
    config.model.image.patch_size = patch_size
    config.model.image.posemb.max_len = 16  # 16 patches per side covers 256 px
    config.model.text.max_len = max_text_len
    config.model.text.vocab_size = 0  # 0: the dataset tokenizer's
    config.model.embed_dim = 64

    config.optimizer.learning_rate = 1e-3
    # No decay on the learned temperature and bias (scalars with a meaning, not weights).
    config.optimizer.weight_decay = (("log_logit_scale|bias", 0.0), (".*", 1e-4))
    config.optimizer.schedule.kind = "cosine"
    config.optimizer.schedule.warmup_steps = 50
    return config
