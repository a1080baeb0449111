"""The recipes load and their fields agree with each other (sizes, lengths, tasks); recipe
arguments parse or fail naming the bad item."""

import numpy as np
import pytest

from navit_seq import config_common, config_utils, pipeline
from navit_seq.data import mixing
from navit_seq.models import decoder
from navit_seq.tasks.detection import DetectionTask
from navit_seq.tasks.sequence import sequence_tasks
from navit_seq.tasks.vocab import Vocab
from navit_seq.train import sequence

SCENES = "configs/pix2seq_scenes.py"
TEXTURES = "configs/navit_textures.py"
PAPER = "configs/pix2seq_v2_multitask.py"
ALL_TASKS = {"detection", "segmentation", "keypoints", "captioning"}


@pytest.mark.parametrize("recipe", [SCENES, PAPER])
def test_recipe_encoder_covers_every_patch_grid_and_decoder_covers_every_row(recipe):
    config = config_utils.load_config_file(recipe)
    assert config.trainer == "sequence"
    assert config.model.patch_size == config.data.patch_size
    assert 0 < config.data.max_grid_side <= config.model.posemb.max_len
    # The largest training image fits the grid cap, so no position is ever clamped.
    assert config.data.resolution.max_side <= config.data.max_grid_side * config.data.patch_size
    assert config.model.decoder.max_len >= config.data.task.seq_len
    assert config.data.eval_max_tokens <= config.data.seq_len
    pipeline.validate_data_config(config.data)


@pytest.mark.parametrize("recipe", [SCENES, PAPER])
def test_recipe_trains_all_four_tasks_with_weights_from_the_config(recipe):
    config = config_utils.load_config_file(recipe)
    weights = dict(mixing.task_weights(config.data))
    assert set(weights) == ALL_TASKS
    assert sum(weights.values()) == pytest.approx(1.0)


def test_paper_recipe_keeps_the_paper_task_weights_and_optimizer():
    config = config_utils.load_config_file(PAPER)
    assert config.runnable_here is False
    assert dict(config.data.tasks) == pytest.approx(
        {"detection": 0.1782, "segmentation": 0.7128, "captioning": 0.099, "keypoints": 0.01}
    )
    assert (config.optimizer.b1, config.optimizer.b2) == (0.9, 0.95)
    assert config.optimizer.weight_decay[-1][1] == 0.05
    sizes = decoder.decoder_sizes(config.model.decoder)
    assert (sizes["depth"], sizes["width"]) == (6, 512)


def test_scenes_recipe_resolves_its_decoder_vocabulary_on_the_scene_dataset(scenes_data_dir):
    config = config_utils.load_config_file(f"{SCENES}:data_dir={scenes_data_dir}")
    sequence.resolve_config(config)
    assert config.model.decoder.vocab_size == max(
        task.vocab.size for task in sequence_tasks(config.data)
    )
    assert sequence.task_ids(config).keys() == ALL_TASKS


def test_recipe_arguments_parse_and_a_malformed_one_is_an_error_naming_it():
    known = ("steps", "loss")
    assert config_common.recipe_options(None, known=known) == {}
    parsed = config_common.recipe_options("steps=50,loss=softmax", known=known)
    assert parsed == {"steps": "50", "loss": "softmax"}
    with pytest.raises(ValueError, match="recipe argument 'steps' .* is not name=value"):
        config_common.recipe_options("steps", known=known)
    with pytest.raises(ValueError, match="is not name=value"):
        config_utils.load_config_file("configs/quickstart.py:steps50")
    with pytest.raises(ValueError, match="'steps' is given twice"):
        config_common.recipe_options("steps=1,steps=2", known=known)


@pytest.mark.parametrize(
    ("recipe", "takes"),
    [("quickstart", "steps"), ("navit_shapes", "steps"), ("navit_textures", "steps"),
     ("contrastive", "steps, loss, data"),
     ("pix2seq_scenes", "steps, data_dir, tasks, data, long"), ("navit_b16_pretrain", "runlocal"),
     ("pix2seq_v2_multitask", "runlocal")],
)  # fmt: skip
def test_misspelt_recipe_argument_is_an_error_listing_the_recipes_arguments(recipe, takes):
    with pytest.raises(ValueError, match=f"recipe argument 'stpes' .* it takes {takes}\\."):
        config_utils.load_config_file(f"configs/{recipe}.py:stpes=5")


def test_scenes_recipe_long_trains_3000_steps_evaluating_every_1000_and_ties_token_labels():
    long = config_utils.load_config_file(f"{SCENES}:long,tasks=detection")
    assert (long.num_train_steps, long.eval_every_steps) == (3000, 1000)
    assert config_utils.load_config_file(f"{SCENES}:long,steps=10").num_train_steps == 10
    off = config_utils.load_config_file(f"{SCENES}:tasks=detection")
    off.data.token_labels = False  # one switch: the model's head goes with the data's grids
    assert off.model.token_labels is False


def test_scenes_recipe_trains_the_named_subset_of_tasks_with_equal_weights():
    detection = config_utils.load_config_file(f"{SCENES}:tasks=detection")
    assert detection.data.tasks == (("detection", 1.0),)
    two = config_utils.load_config_file(f"{SCENES}:tasks=captioning+detection")
    assert two.data.tasks == (("detection", 0.5), ("captioning", 0.5))  # in the recipe's order
    full = config_utils.load_config_file(SCENES)
    assert detection.model.to_dict() == full.model.to_dict()  # init_from carries it over
    with pytest.raises(ValueError, match="tasks='boxes' names \\['boxes'\\]"):
        config_utils.load_config_file(f"{SCENES}:tasks=boxes")


def test_every_recipe_has_the_shared_loop_fields_and_steps_follow_the_argument():
    for recipe in ("quickstart", "navit_shapes", "navit_textures", "contrastive", "pix2seq_scenes"):
        config = config_utils.load_config_file(f"configs/{recipe}.py:steps=7")
        assert config.num_train_steps == 7
        assert config.seed == 0 and config.log_batch_fingerprint is False
        assert config.checkpoint_every_steps > 0 and config.keep_checkpoints > 0


def test_scenes_recipe_reads_the_named_scene_variant():
    assert config_utils.load_config_file(SCENES).data.name == "scenes"
    assert config_utils.load_config_file(f"{SCENES}:data=scenes_easy").data.name == "scenes_easy"


def test_textures_recipe_trains_where_its_quarter_test_side_is_seen_and_never_flips():
    config = config_utils.load_config_file(TEXTURES)
    data = config.data
    assert (config.trainer, config.loss, data.name) == ("classification", "softmax_xent",
                                                        "scene_textures")  # fmt: skip
    assert (
        data.resolution.min_side
        <= data.eval_side // 4
        < data.eval_side
        <= (data.resolution.max_side)
    )
    assert data.resolution.max_side <= data.max_grid_side * data.patch_size
    # A left-right flip turns rising stripes into falling ones: another class.
    assert data.augment.flip_left_right == 0
    pipeline.validate_data_config(data)


def test_textures_recipe_trains_two_steps_and_evaluates_on_the_texture_scenes(
    textures_data_dir, tmp_path
):
    import json

    from navit_seq.train import classification, loop

    config = config_utils.load_config_file(f"{TEXTURES}:steps=2")
    config.data.data_dir = textures_data_dir
    config.data.num_workers = 0
    config.data.batch_size = 8  # one row per simulated device (tests/conftest.py)
    config.log_every_steps = 1
    config.eval_every_steps = config.checkpoint_every_steps = 2
    loop.train_and_evaluate(config, tmp_path, classification.objective(config))
    assert config.model.num_classes == 12  # from the dataset
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    (evaluation,) = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and evaluation["step"] == 2
    assert all(np.isfinite(r["loss"]) for r in train + [evaluation])
    assert 0 <= evaluation["precision_at_1"] <= 1


def test_scenes_detection_alone_on_the_easy_scenes_uses_rows_that_hold_its_objects_twice():
    import runpy

    from navit_seq.data import scene_render
    from navit_seq.data.builders import scenes

    most_objects = runpy.run_path(SCENES)["MOST_OBJECTS"]
    for variant, count in most_objects.items():  # the recipe's table follows the builders
        assert scene_render.SceneSpec(**scenes.VARIANTS[variant].SPEC).max_objects == count
    easy = config_utils.load_config_file(f"{SCENES}:data=scenes_easy,tasks=detection")
    detection = DetectionTask(Vocab(num_classes=12), seq_len=easy.data.task.seq_len)
    assert easy.data.task.seq_len == 32
    assert detection.capacity == 2 * most_objects["scenes_easy"]  # objects + as many noise
    all_tasks = config_utils.load_config_file(f"{SCENES}:data=scenes_easy")
    assert all_tasks.data.task.seq_len == 64  # keypoint rows need 40 tokens
    assert easy.model.to_dict() == all_tasks.model.to_dict()  # init_from carries it over
    full_scenes = config_utils.load_config_file(f"{SCENES}:tasks=detection")
    assert full_scenes.data.task.seq_len == 64  # 10 objects + noise do not fit in fewer
    # Masks and keypoints are prompted by twice as many top boxes as a scene holds objects.
    assert all_tasks.evaluation.max_instances == 2 * most_objects["scenes_easy"]
    assert full_scenes.evaluation.max_instances == 16  # the default: 2 x 10 would be more


RECIPES = ("quickstart", "navit_shapes", "navit_textures", "contrastive", "pix2seq_scenes",
           "navit_b16_pretrain", "pix2seq_v2_multitask")  # fmt: skip


def _model_patch_size(config):
    return config.model.image.patch_size if "image" in config.model else config.model.patch_size


@pytest.mark.parametrize("recipe", RECIPES)
def test_changing_the_data_patch_size_moves_the_models_and_steps_move_the_schedule(recipe):
    config = config_utils.load_config_file(f"configs/{recipe}.py")
    config.lock()  # as the command line holds it: the override goes through the reference
    assert _model_patch_size(config) == config.data.patch_size
    config.data.patch_size = 8
    assert _model_patch_size(config) == 8
    config.num_train_steps = 123
    assert config.optimizer.schedule.decay_steps == 123


@pytest.mark.parametrize("recipe", ["navit_shapes", "navit_textures", "pix2seq_scenes"])
def test_the_grid_cap_and_the_position_table_are_one_value(recipe):
    config = config_utils.load_config_file(f"configs/{recipe}.py")
    config.data.max_grid_side = 20
    assert config.model.posemb.max_len == 20


@pytest.mark.parametrize("recipe", [SCENES, PAPER])
def test_the_decoder_position_table_follows_the_row_length(recipe):
    config = config_utils.load_config_file(recipe)
    config.data.task.seq_len = 96
    assert config.model.decoder.max_len == 96


def test_scenes_detection_rows_are_shorter_than_the_decoder_table_and_not_tied_to_it():
    config = config_utils.load_config_file(f"{SCENES}:data=scenes_easy,tasks=detection")
    config.model.decoder.max_len = 80
    assert config.data.task.seq_len == 32


def test_contrastive_caption_length_and_text_position_table_are_one_value():
    config = config_utils.load_config_file("configs/contrastive.py")
    config.data.task.max_text_len = 40
    assert config.model.text.max_len == 40


def test_paper_recipe_token_budget_and_grid_follow_the_image_side():
    config = config_utils.load_config_file(PAPER)
    assert (config.data.max_grid_side, config.data.seq_len) == (40, 1600)  # 640 px / 16
    config.data.resolution.max_side = 320
    assert config.data.resolution.min_side == 160
    assert (config.data.max_grid_side, config.data.seq_len) == (20, 400)
    assert config.data.eval_max_tokens == 400


@pytest.mark.parametrize("recipe", [PAPER, "configs/navit_b16_pretrain.py"])
def test_runlocal_gives_the_pod_recipe_at_cpu_size_on_the_bundled_scenes(recipe):
    pod = config_utils.load_config_file(recipe)
    local = config_utils.load_config_file(f"{recipe}:runlocal")
    assert pod.runnable_here is False and local.runnable_here is True
    assert local.mesh.shape == (-1, 1, 1) and local.data.batch_size <= 16
    assert (local.data.name, local.data.data_dir) == ("scenes", "datasets")
    assert local.model.width <= 96 and local.model.depth == 2
    assert local.model.dtype == "float32"
    assert local.num_train_steps == local.optimizer.schedule.decay_steps == 300
    assert local.model.patch_size == local.data.patch_size == pod.data.patch_size
    # Only sizes change: the paper's modelling and optimizer choices stay.
    for key in ("trainer", "loss"):
        assert local[key] == pod[key]
    assert local.optimizer.schedule.kind == pod.optimizer.schedule.kind
    assert (local.optimizer.b1, local.optimizer.b2) == (pod.optimizer.b1, pod.optimizer.b2)
    pipeline.validate_data_config(local.data)


def test_paper_recipe_runlocal_fits_its_rows_and_grid_and_keeps_the_task_weights():
    pod = config_utils.load_config_file(PAPER)
    local = config_utils.load_config_file(f"{PAPER}:runlocal")
    assert local.data.task.seq_len == local.model.decoder.max_len == 64
    assert local.data.seq_len == local.data.max_grid_side**2 == 100  # 160 px in 16 px patches
    assert local.data.max_grid_side <= local.model.posemb.max_len
    assert local.model.decoder.width <= 96
    assert dict(local.data.tasks) == dict(pod.data.tasks)


def test_scenes_runlocal_recipe_resolves_on_the_scene_dataset(scenes_data_dir):
    config = config_utils.load_config_file(f"{PAPER}:runlocal")
    config.data.data_dir = scenes_data_dir
    sequence.resolve_config(config)
    assert sequence.task_ids(config).keys() == ALL_TASKS
