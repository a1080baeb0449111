"""The one example structure every dataset builder yields (scene, COCO-format, ...).

Conventions (the whole codebase relies on them):
- Coordinates are **(y, x)** and **normalized** by the image's own height and width to [0, 1].
  An aspect-preserving resize of the whole image therefore leaves every annotation unchanged;
  only crops and flips move them. Converting back to pixels uses the image's true size.
- `bbox` is [ymin, xmin, ymax, xmax] (the TFDS BBox convention).
- Instance masks are COCO compressed RLE (`mask_rle`, the `counts` bytes; the size is the
  image's) at the image's stored resolution, plus polygons in a flat layout:
  `polygon_points` [P, 2] (y, x) holds every polygon's vertices back to back, `polygon_sizes`
  [Q] the vertex count of each polygon, ordered by object, and `objects/num_polygons` how many
  of those polygons belong to each object (0 for crowd objects, which have RLE only).
  An object without any mask (detection-only data) has `mask_rle` b"" and no polygons.
- Keypoints are [17, 3] per object: (y, x, visibility) in COCO order with COCO flags
  (0 = not labelled, 1 = labelled but occluded, 2 = visible); all zeros for objects without
  keypoints. Keypoints outside the image keep their coordinates outside [0, 1] only if
  labelled; COCO itself marks them v = 0.
- `objects/label` is the dataset's contiguous class index; `objects/category_id` the original
  id (COCO's ids are not contiguous) kept for evaluation with pycocotools.
- `objects/phrase` is a noun phrase naming the object ("the small red circle"), used for
  grounding; an empty string where the dataset has none.
"""

from collections.abc import Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

# TensorFlow is only a reader/writer here: it must never claim an accelerator that JAX needs.
tf.config.set_visible_devices([], "GPU")
tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None

NUM_KEYPOINTS = 17
# COCO person keypoint order.
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
# COCO's skeleton (1-based keypoint indices), for drawing.
KEYPOINT_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip


def example_features(
    class_names: Sequence[str], image_encoding: str = "jpeg"
) -> tfds.features.FeaturesDict:
    """The TFDS feature structure shared by every builder (see the module docstring)."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_encoding),
            "image_id": tf.int64,  # the dataset's own image id (COCO's id for COCO data)
            "objects": tfds.features.Sequence(
                {
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=tf.float32),
                    "label": tfds.features.ClassLabel(names=list(class_names)),
                    "category_id": tf.int64,
                    "id": tf.int64,  # annotation id
                    "is_crowd": tf.bool,
                    "area": tf.float32,  # mask area in pixels at the stored resolution
                    "mask_rle": tfds.features.Tensor(shape=(), dtype=tf.string),
                    "num_polygons": tf.int32,
                    "keypoints": tfds.features.Tensor(shape=(NUM_KEYPOINTS, 3), dtype=tf.float32),
                    "num_keypoints": tf.int32,  # keypoints with visibility > 0
                    "phrase": tfds.features.Text(),
                }
            ),
            "polygon_points": tfds.features.Tensor(shape=(None, 2), dtype=tf.float32),
            "polygon_sizes": tfds.features.Tensor(shape=(None,), dtype=tf.int32),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }
    )
