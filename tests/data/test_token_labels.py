"""Token-label grids (navit_seq.data.token_labels) against a per-cell loop, and in the pipeline:
every packed token's label is its image's grid at its patch coordinates."""

import ml_collections
import numpy as np
import pytest

from navit_seq.data import token_labels

G = 6


def reference_grid(boxes, labels, num_classes, rows, cols, is_crowd=None):
    """One cell at a time: the smallest known, non-crowd box holding the cell's centre."""
    grid = np.full((G, G), -1)
    for r in range(rows):
        for c in range(cols):
            y, x = (r + 0.5) / rows, (c + 0.5) / cols
            best, best_area = 0, np.inf
            for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
                if not 0 <= label < num_classes or (is_crowd is not None and is_crowd[i]):
                    continue
                ymin, xmin, ymax, xmax = box
                area = (ymax - ymin) * (xmax - xmin)
                if ymin <= y < ymax and xmin <= x < xmax and area < best_area:
                    best, best_area = label + 1, area
            grid[r, c] = best
    return grid


@pytest.mark.parametrize("seed", range(5))
def test_grid_matches_a_per_cell_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 5))
    corners = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1)  # [n, (min, max), (y, x)]
    boxes = np.concatenate([corners[:, 0], corners[:, 1]], axis=1)  # ymin xmin ymax xmax
    labels = rng.integers(-1, 4, n)  # -1: an unknown class labels nothing
    is_crowd = rng.random(n) < 0.2
    rows, cols = int(rng.integers(1, G + 1)), int(rng.integers(1, G + 1))
    objects = {"bbox": boxes, "label": labels, "is_crowd": is_crowd}
    grid = token_labels.label_grid(objects, 3, rows, cols, G)
    np.testing.assert_array_equal(grid, reference_grid(boxes, labels, 3, rows, cols, is_crowd))


def test_small_object_inside_a_large_one_keeps_its_own_label():
    objects = {"bbox": np.array([[0, 0, 1, 1], [0.25, 0.25, 0.75, 0.75]]), "label": [0, 1]}
    grid = token_labels.label_grid(objects, 2, 4, 4, G)
    np.testing.assert_array_equal(grid[:4, :4], [[1, 1, 1, 1], [1, 2, 2, 1], [1, 2, 2, 1],
                                                 [1, 1, 1, 1]])  # fmt: skip
    assert (grid[4:] == token_labels.IGNORE).all() and (grid[:, 4:] == token_labels.IGNORE).all()


def test_image_without_objects_is_all_background_inside_its_grid():
    grid = token_labels.label_grid({"bbox": np.zeros((0, 4)), "label": []}, 3, 2, 3, G)
    assert (grid[:2, :3] == 0).all() and (grid[2:] == -1).all() and (grid[:, 3:] == -1).all()


def labelled_recipe(data_dir: str) -> ml_collections.ConfigDict:
    from navit_seq import config_utils

    config = config_utils.load_config_file(
        f"configs/pix2seq_scenes.py:data_dir={data_dir},tasks=detection+keypoints"
    )
    # One epoch: training example ids count on through later epochs (grain's repeat).
    config.data.update(num_workers=0, batch_size=4, seq_len=192, token_labels=True, num_epochs=1)
    config.data.source_cache_mb = 0
    config.data.token_drop.update(kind="constant", rate=0.3)  # dropped tokens keep their coords
    config.data.mixing = "data"
    config.data.task.seq_len = 40  # keypoints: 6 + 34 tokens
    return config


def test_packed_tokens_carry_their_images_grid_labels(scenes_data_dir):
    """Each whole-image slot's grid is label_grid of its source example; each token's label
    (navit_seq.losses.token_labels) is that grid at its coordinates; crops are IGNORE."""
    from navit_seq import pipeline, tasks
    from navit_seq.data import sources
    from navit_seq.losses.token_labels import labels_of_tokens

    config = labelled_recipe(scenes_data_dir)
    num_classes = tasks.num_classes(tasks.task_config(config.data, "detection"))
    source = sources.data_source("scenes", "train", scenes_data_dir)
    task_list = pipeline.recipe_tasks(config.data)
    keypoints_id = next(t.task_id for t in task_list if t.name == "keypoints")
    batch = next(iter(pipeline.train_batches(config.data, task_list)))
    grids = batch["targets"][token_labels.TARGET_KEY]  # [B, E, G, G]
    grid_cells = batch["image_grid"].prod(-1)[batch["example_valid"]].sum()
    assert (batch["segment_ids"] > 0).sum() < grid_cells  # tokens were dropped
    token_labels_of_batch = np.asarray(labels_of_tokens(batch))
    checked = 0
    for b, e in zip(*np.nonzero(batch["example_valid"]), strict=True):
        if batch["task_id"][b, e] == keypoints_id:  # a person crop: not in the boxes' frame
            assert (grids[b, e] == token_labels.IGNORE).all()
            continue
        example = source[int(batch["example_id"][b, e])]
        rows, cols = batch["image_grid"][b, e]
        expected = token_labels.label_grid(
            example["objects"], num_classes, int(rows), int(cols), config.data.max_grid_side
        )
        np.testing.assert_array_equal(grids[b, e], expected)
        tokens = batch["segment_ids"][b] == e + 1
        coords = batch["patch_coords"][b][tokens]
        np.testing.assert_array_equal(
            token_labels_of_batch[b][tokens], expected[coords[:, 0], coords[:, 1]]
        )
        checked += 1
    assert checked > 0
    assert (token_labels_of_batch[batch["segment_ids"] == 0] == token_labels.IGNORE).all()


def test_token_labels_without_a_grid_limit_are_refused_naming_the_field():
    from navit_seq import pipeline

    config = pipeline.default_data_config()
    config.update(token_labels=True, max_grid_side=0)
    with pytest.raises(ValueError, match=r"data.token_labels=True .* data.max_grid_side=0"):
        pipeline.validate_data_config(config)
