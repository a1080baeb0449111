"""Pix2Seq-v2 multi-task on the bundled scenes: detection, segmentation, keypoints, captioning.

A tiny NaViT encoder + decoder trained on 2 CPU cores in minutes (`trainer = "sequence"`):
    python -m navit_seq.data.build scenes --data-dir datasets \
        --train-size 4000 --validation-size 500 --heldout-size 500
    python -m navit_seq.main --config configs/pix2seq_scenes.py --workdir workdirs/scenes_mt
    python -m navit_seq.predict --workdir workdirs/scenes_mt --image PATH  # PNG + JSON
Arguments (e.g. `configs/pix2seq_scenes.py:steps=300,data_dir=/tmp/data,tasks=detection,
data=scenes_easy`): `long` trains 3000 steps (evaluating every 1000: the learning curve of a
longer CPU run, under an hour on 2 cores), `steps` overrides num_train_steps, `data_dir` where
the scenes dataset was built, `data` which scene variant (`scenes`, the default;
`scenes_easy`, the quickstart's), `tasks` a `+`-joined subset of the four tasks trained with
equal weights (e.g. `tasks=detection` for the first stage of staged training: the model is the
same, so `--config.init_from` carries it to the next; detection alone on `scenes_easy` trains
on 32-token rows, MOST_OBJECTS).
Per-task training losses are logged as `loss/<task>` in WORKDIR/metrics.jsonl. The
paper-scale COCO recipe is `configs/pix2seq_v2_multitask.py`.
"""

import ml_collections

from navit_seq import config_common
from navit_seq.inference import default_evaluation_config
from navit_seq.models.pix2seq import default_pix2seq_config
from navit_seq.pipeline import default_data_config
from navit_seq.train.sequence import default_loss_config

PATCH_SIZE = 16
MAX_GRID_SIDE = 12  # patches per side: 192 px, above resolution.max_side
# Decoder row length T, shared by the four tasks: keypoints need 6 prompt + 34 tokens,
# detection fits (64 - 1) / 5 = 12 objects (a scene has ~5), a polygon 29 points (the
# segmentation codec caps its points by T).
ROW_LENGTH = 64
# Most objects in an image of each scene variant (data.build --variant). Detection trained
# alone needs rows of 1 + 5 * (objects + as many noise objects) + 1 tokens only: 32 on the easy
# scenes, half the decoder's work (compiled step 0.20 -> 0.13 s, experiments/benchmarks/
# recipe_step.py). The model is the same, so the decoder keeps max_len = ROW_LENGTH for the
# next stage. tests/test_recipes.py checks these counts against the scene builders.
MOST_OBJECTS = {"scenes": 10, "scenes_easy": 3}
# Task weights (the Pix2Seq v2 batch mixing: each batch is one task drawn by weight). COCO's
# weights (configs/pix2seq_v2_multitask.py) favour segmentation; the scenes are simple enough
# that equal shares train every task.
TASKS = ("detection", "segmentation", "keypoints", "captioning")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = config_common.recipe_options(
        arg, known=("steps", "data_dir", "tasks", "data"), switches=("long",)
    )
    long = "long" in options
    config = config_common.header(
        "sequence",  # navit_seq.train.sequence
        steps=int(options.get("steps", 3000 if long else 300)),
        log_every_steps=10,
        # And at the last step: one evaluation in a short run.
        eval_every_steps=1000 if long else 500,
        checkpoint_every_steps=100,
        keep_checkpoints=2,
    )
    config.loss = default_loss_config()
    config.loss.label_smoothing = 0.0  # (Pix2Seq reference code) none
    # Token labels (navit_seq.data.token_labels): each patch also learns the class of the object
    # under it, one labelled token weighing as much as one decoder token. Not in Pix2Seq; on
    # scenes_easy, detection alone, 1000 steps, 16k training scenes, one seed: bbox AP50 on
    # 100 validation images 0.063 -> 0.119, AP 0.023 -> 0.043 (README).
    config.loss.token_label_weight = 1.0
    token_labels = ml_collections.FieldReference(True)  # data and model: one switch
    # One value each, however many fields hold it (an override of one moves them all).
    patch_size = ml_collections.FieldReference(PATCH_SIZE)
    max_grid_side = ml_collections.FieldReference(MAX_GRID_SIDE)
    row_length = ml_collections.FieldReference(ROW_LENGTH)  # decoder.max_len, the rows' T

    config.data = default_data_config()
    config.data.name = options.get("data", "scenes")  # a scene variant (data.build --variant)
    config.data.data_dir = options.get("data_dir", "datasets")
    config.data.patch_size = patch_size
    # Small images keep a CPU step short: longer side ~ U(48, 160) -> at most 100 tokens.
    config.data.resolution.min_side = 48
    config.data.resolution.max_side = 160
    config.data.seq_len = 192
    config.data.batch_size = 16
    config.data.max_examples_per_seq = 8
    config.data.max_rows_per_seq = 8  # segmentation: one row per object, ~5 per scene
    config.data.pack_buffer_size = 32
    config.data.eval_max_tokens = 100
    config.data.max_grid_side = max_grid_side
    config.data.num_workers = 1
    # Decoded training examples stay in the worker's memory (sources.CachedSource): from the
    # second epoch on, no record parsing or image decoding (pipeline CPU per batch of ~107
    # scenes_easy images 0.295 -> 0.192 s). ~1.2 GB for 4000 scenes_easy examples of sides
    # 48-640, so the quickstart's 16k fit in 6 GB; a larger dataset fills the budget and decodes
    # the rest each time (16k in 2 GB: 0.63 s a step against 0.57 for 4k all cached).
    config.data.source_cache_mb = 6144
    config.data.token_drop.kind = "none"
    config.data.token_labels = token_labels
    names = options.get("tasks", "+".join(TASKS)).split("+")
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(
            f"configs/pix2seq_scenes.py: tasks={options['tasks']!r} names {unknown}; use a "
            f"'+'-joined subset of {'+'.join(TASKS)}."
        )
    seq_len = row_length
    if names == ["detection"] and config.data.name in MOST_OBJECTS:  # shorter rows, same model
        seq_len = min(ROW_LENGTH, 1 + 5 * 2 * MOST_OBJECTS[config.data.name] + 1)
    config.data.tasks = tuple((name, 1.0 / len(names)) for name in TASKS if name in names)
    config.data.mixing = "batch"
    config.data.task = dict(
        name="detection",  # the options below are shared by the four tasks
        seq_len=seq_len,
        num_bins=64,  # coordinate bins: 2.5 px at 160 px (Pix2Seq: 1000 at 640+ px)
        max_instances=8,  # segmentation / keypoint rows per image
        # Detection: largest object first. Pix2Seq keeps random order for long training; in a
        # CPU budget one right answer per position trains faster (README, detection table).
        object_order="area",
        # Token ids: coordinates right after the 12 classes, not from 1000 as in Pix2Seq
        # (tasks/vocab.py): 263 logits per decoder token instead of 1151 (step 0.25 -> 0.20 s).
        vocab_layout="compact",
        # Segmentation trains on one instance per image, drawn anew each epoch (Pix2Seq v2
        # samples instances too): with a row per object its rows ran out before its tokens
        # (41.8% padding, 4.0 images per row; now 3%, 6.7), so the four tasks' batches
        # averaged 12.3% padding, now ~2.6% (experiments/benchmarks/multitask_padding.py).
        segmentation=dict(max_instances=1),
    )

    config.model = default_pix2seq_config()
    config.model.variant = "Ti"
    config.model.width = 96  # tiny: a few minutes on 2 CPU cores
    config.model.depth = 2
    config.model.num_heads = 3
    config.model.mlp_dim = 192
    config.model.patch_size = patch_size
    # A conv stem inside each patch (Xiao et al. 2021): the tiny ViT reads objects sooner.
    config.model.patch_embedding = "conv"
    config.model.token_labels = token_labels
    config.model.posemb.max_len = max_grid_side
    # "error" checks positions with a host callback, which can deadlock a loaded CPU client;
    # data.max_grid_side = posemb.max_len keeps every position in the table, so "clamp"
    # never clamps here.
    config.model.posemb.out_of_range = "clamp"
    config.model.decoder.variant = "Ti"
    config.model.decoder.width = 96
    config.model.decoder.depth = 2
    config.model.decoder.num_heads = 3
    config.model.decoder.mlp_dim = 192
    config.model.decoder.max_len = row_length
    config.model.decoder.vocab_size = 0  # 0: the tasks' shared vocabulary size
    # Coordinate bins start as position embeddings of their bin (models/decoder.py): on a toy
    # detection set, AP50 0.039 -> 0.097 at 300 steps with the output bias (README).
    config.model.decoder.coord_embedding_init = "sinusoidal"
    # Cross-attention starts as a copy of the attended memory (models/decoder.py), so the first
    # gradients already say "attend where the box is".
    config.model.decoder.cross_attention_init = "copy"

    config.optimizer.learning_rate = 3e-3
    config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95  # (Pix2Seq v2)
    config.optimizer.weight_decay = ((r".*", 1e-4),)
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.schedule.kind = "cosine"
    config.optimizer.schedule.warmup_steps = 30

    # Whole-split inference + COCO AP / caption scores at each evaluation (and for predict).
    config.evaluation = default_evaluation_config()
    config.evaluation.num_images = 100  # the first 100 validation images (0: all 500)
    if config.data.name in MOST_OBJECTS:
        # Masks and keypoints are prompted by each image's top-scored boxes: twice as many as
        # the scenes hold objects, not 16. Every box costs segm_samples = 8 decoder rows; on
        # 100 easy scenes, 4 tasks: 48.9 s -> 36.1 s (experiments/benchmarks/evaluation.py).
        config.evaluation.max_instances = min(
            config.evaluation.max_instances, 2 * MOST_OBJECTS[config.data.name]
        )
    return config
