"""Per-image predictions of a Pix2Seq model for every sequence task of its recipe (Pix2Seq v2).

Order per chunk of `evaluation.images_per_batch` images (each packed alone into one row of a
fixed-shape batch at the eval token budget, so nothing recompiles):
1. detection: greedy or nucleus decoding under the codec's grammar to the row's full length;
   every group is a box, its class the most likely real class, its score that class's
   probability under the unconstrained distribution (Pix2Seq's reference inference);
2. segmentation and keypoints, prompted by the detected boxes (or the ground-truth ones,
   `evaluation.use_gt_boxes`): one decoder row per box, all rows of an image in one call (the
   image encoded once). Segmentation draws `segm_samples` masks per box, averages them and
   keeps pixels where >= 50% agree; keypoints decode 17 coordinate pairs on the person crop with
   INVISIBLE masked out, i.e. the model's best coordinate guess;
3. captioning: greedy.
Output per image: {"image_id", "boxes" [N, 4] normalized (ymin, xmin, ymax, xmax), "labels"
[N], "scores" [N], "masks" (N COCO RLE dicts at the stored size, None past `max_instances`),
"keypoints" [N, 17, 3] (y, x, v) normalized (all zero where not predicted), "caption" str};
keys of tasks the recipe does not train are absent.
"""

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from pycocotools import mask as mask_utils

from navit_seq import cli, decode, pipeline
from navit_seq.data import mixing, patches, resolution
from navit_seq.tasks.keypoints import NUM_KEYPOINTS, RESPONSE_LENGTH, crop_image
from navit_seq.tasks.segmentation import polygons_to_rle
from navit_seq.tasks.sequence import sequence_tasks


def default_evaluation_config() -> ml_collections.ConfigDict:
    """`config.evaluation`: whole-split inference + COCO/caption metrics (Pix2Seq v2 §4)."""
    return ml_collections.ConfigDict(
        {
            "every_steps": 0,  # during training: 0 = at every eval (eval_every_steps); -1 never
            "split": "",  # "": data.eval_split
            "num_images": 64,  # first images of the split scored (0 = all)
            "images_per_batch": 4,  # packed rows per decoder call
            "max_instances": 16,  # boxes per image prompted for masks / keypoints
            "segm_samples": 8,  # masks sampled per box, averaged, thresholded at 50% (paper)
            "use_gt_boxes": False,  # prompt segmentation/keypoints with ground-truth boxes
            "detection_top_p": 0.0,  # 0 = greedy; the paper samples with top_p 0.4
            "segmentation_top_p": 0.8,  # (paper)
            "keypoints_top_p": 0.0,  # 0 = greedy (the paper: 0.1, nearly greedy)
            "keypoint_classes": ("person",),  # class names whose boxes get keypoint rows
            "seed": 0,
        }
    )


def evaluation_problems(config: ml_collections.ConfigDict, class_names: Sequence[str]) -> list[str]:
    """What in `config.evaluation` cannot work with the recipe's tasks and its dataset's
    classes, one item per problem naming the key ([] = none). Checked by every Predictor and,
    before training, by the commands (`navit_seq.main.check_data`)."""
    options = config.get("evaluation", default_evaluation_config())
    names = {name for name, _ in mixing.task_weights(config.data)}
    least = {"images_per_batch": 1, "segm_samples": 1, "max_instances": 1, "num_images": 0}
    problems = [
        f"evaluation.{key}={options[key]}; use at least {value}"
        for key, value in least.items()
        if options[key] < value
    ]
    problems += [
        f"evaluation.{key}={options[key]}; use 0 (greedy) up to 1"
        for key in ("detection_top_p", "segmentation_top_p", "keypoints_top_p")
        if not 0 <= options[key] <= 1
    ]
    prompted = names & {"segmentation", "keypoints"}
    if prompted and "detection" not in names and not options.use_gt_boxes:
        problems.append(
            "evaluation.use_gt_boxes=False but the recipe has no detection task to prompt "
            "segmentation/keypoints with; set use_gt_boxes=True or add detection"
        )
    if "keypoints" in names and not set(options.keypoint_classes) & set(class_names):
        problems.append(
            f"evaluation.keypoint_classes={tuple(options.keypoint_classes)} names none of the "
            f"classes of dataset {config.data.name!r} ({', '.join(class_names)}), so no "
            "keypoints would be predicted; name the class(es) annotated with keypoints"
        )
    return problems


def average_masks(masks: np.ndarray) -> np.ndarray:
    """Sampled binary masks [N, H, W] -> bool [H, W]: pixels set in at least half of them."""
    return np.asarray(masks, np.float32).mean(axis=0) >= 0.5


# Token masks are static arguments of the jitted decoder (a new function recompiles): one per
# grammar for the whole process, so every Predictor (each evaluation in training) reuses them.
_TOKEN_MASKS: dict[tuple, decode.TokenMask] = {}


def _token_mask(grammar: np.ndarray, prompt_length: int) -> decode.TokenMask:
    key = (grammar.shape, grammar.tobytes(), prompt_length)
    if key not in _TOKEN_MASKS:
        _TOKEN_MASKS[key] = decode.cyclic_token_mask(grammar, prompt_length)
    return _TOKEN_MASKS[key]


def _padded(grammar: np.ndarray, vocab_size: int) -> np.ndarray:
    """The grammar [G, V_tasks] with False columns up to the model's `vocab_size` outputs."""
    missing = max(vocab_size - grammar.shape[1], 0)
    return np.pad(grammar, ((0, 0), (0, missing)), constant_values=False)


def _decode_config(max_len: int, top_p: float) -> decode.DecodeConfig:
    if top_p > 0:
        return decode.DecodeConfig(max_len=max_len, method="sample", top_p=top_p)
    return decode.DecodeConfig(max_len=max_len)


@dataclasses.dataclass
class _Image:
    """One packed image: its patch tokens, and the decoder rows' prompts that read it."""

    tokens: dict[str, np.ndarray]
    prompts: np.ndarray  # [r, P] int32


class Predictor:
    """Runs the recipe's sequence tasks on decoded examples (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, model: Any):
        from navit_seq.data import sources

        self.model = model
        self.data = config.data
        self.options = config.get("evaluation", default_evaluation_config())
        if self.data.eval_max_tokens > self.data.seq_len:
            raise ValueError(
                f"data.eval_max_tokens={self.data.eval_max_tokens} > data.seq_len="
                f"{self.data.seq_len}: inference packs one image per row; lower eval_max_tokens."
            )
        recipe_tasks = sequence_tasks(config.data)
        self.tasks = {task.name: task.codec for task in recipe_tasks}
        self.task_ids = {task.name: task.task_id for task in recipe_tasks}  # the batch's task_id
        # Keypoint rows go to boxes of the classes named in evaluation.keypoint_classes; only a
        # recipe with the keypoint task reads the dataset's class names for that.
        class_names = (
            sources.class_names(self.data.name, data_dir=self.data.data_dir)
            if "keypoints" in self.tasks
            else []
        )
        problems = evaluation_problems(config, class_names)
        if problems:
            raise ValueError("; ".join(problems) + ".")
        self.keypoint_labels = {
            class_names.index(name) for name in self.options.keypoint_classes if name in class_names
        }
        # A decoder may have more outputs than the tasks' vocabulary (model.decoder.vocab_size
        # set larger by hand): those ids are never allowed.
        width = config.model.decoder.get("vocab_size") or 0
        self.masks = {
            name: _token_mask(_padded(codec.grammar(), width), codec.PROMPT_LENGTH)
            for name, codec in self.tasks.items()
        }
        self.rng = jax.random.key(self.options.seed)
        self.calls = 0

    # Packing.
    def _image_tokens(self, image: np.ndarray, example_id: int) -> dict[str, np.ndarray]:
        """The eval-time view of an image (`pipeline.eval_resolution_config`), patchified."""
        height, width = image.shape[:2]
        rows, cols, _ = resolution.sample_grid(
            pipeline.eval_resolution_config(self.data),
            height,
            width,
            self.data.patch_size,
            self.data.eval_max_tokens,
            np.random.default_rng(0),  # the eval samplers draw nothing
            max_grid_side=self.data.max_grid_side,
        )
        size = self.data.patch_size
        resized = resolution.resize_image(image, rows * size, cols * size)
        image_patches, coords, grid = patches.patchify(resized, size)
        return {
            "patches": image_patches,  # [N, P*P*3]
            "patch_coords": coords,  # [N, 2]
            "image_grid": grid,
            "image_size": np.array(resized.shape[:2], np.int32),
            "original_size": np.array([height, width], np.int32),
            "example_id": np.int64(example_id),
        }

    def _generate(
        self, images: Sequence[_Image], num_rows: int, task: str, config: decode.DecodeConfig
    ) -> tuple[np.ndarray, np.ndarray]:
        """Packs `images` (<= images_per_batch, one per batch row, `num_rows` decoder rows each)
        and decodes. Returns tokens, token probabilities [len(images), num_rows, max_len]."""
        batch_size, length = self.options.images_per_batch, self.data.seq_len
        prompt_length = self.tasks[task].PROMPT_LENGTH
        depth = self.data.patch_size**2 * 3
        batch = {
            "patches": np.zeros((batch_size, length, depth), np.uint8),  # [B, L, P*P*3]
            "segment_ids": np.zeros((batch_size, length), np.int32),
            "patch_coords": np.zeros((batch_size, length, 2), np.int32),
            "image_grid": np.zeros((batch_size, 1, 2), np.int32),  # E_max = 1
            "image_size": np.zeros((batch_size, 1, 2), np.int32),
            "original_size": np.zeros((batch_size, 1, 2), np.int32),
            "example_valid": np.zeros((batch_size, 1), bool),
            "example_id": np.full((batch_size, 1), -1, np.int64),
            "task_id": np.full((batch_size, 1), self.task_ids[task], np.int32),
            "row_slot": np.full((batch_size, num_rows), -1, np.int32),  # [B, R]
        }
        prompt = np.zeros((batch_size, num_rows, prompt_length), np.int32)  # [B, R, P]
        for b, image in enumerate(images):
            tokens = image.tokens
            count = len(tokens["patches"])
            batch["patches"][b, :count] = tokens["patches"]
            batch["segment_ids"][b, :count] = 1
            batch["patch_coords"][b, :count] = tokens["patch_coords"]
            for key in ("image_grid", "image_size", "original_size"):
                batch[key][b, 0] = tokens[key]
            batch["example_valid"][b, 0] = True
            batch["example_id"][b, 0] = tokens["example_id"]
            batch["row_slot"][b, : len(image.prompts)] = 0
            prompt[b, : len(image.prompts)] = image.prompts
        self.last_batch = {k: jnp.asarray(v) for k, v in batch.items()}  # for inspection
        rng = jax.random.fold_in(self.rng, self.calls)
        self.calls += 1
        out = decode.generate(
            self.model,
            self.last_batch,
            jnp.asarray(prompt),
            rng,
            config,
            self.masks[task],
        )
        tokens = np.asarray(out["tokens"])[: len(images)]
        # Scores are model probabilities (FAKE and END keep their mass): DetectionTask.grammar.
        probs = np.exp(np.asarray(out["model_log_probs"], np.float64))[: len(images)]
        return tokens, probs

    def _chunks(self, items: Sequence[Any], task: str, unit: str) -> Iterator[Sequence[Any]]:
        """`items` in decoder calls of `images_per_batch`, reporting `task` progress."""
        size = self.options.images_per_batch
        progress = cli.Progress(f"predict {task}", total=len(items), unit=unit)
        for start in range(0, len(items), size):
            yield items[start : start + size]
            progress.update(min(start + size, len(items)))
        progress.close()

    # Tasks.
    def _detect(self, examples, images) -> list[dict[str, np.ndarray]]:
        codec = self.tasks["detection"]
        config = _decode_config(codec.seq_len - codec.PROMPT_LENGTH, self.options.detection_top_p)
        prompt = np.array([[codec.vocab.DETECTION_PROMPT]], np.int32)
        found = []
        for chunk in self._chunks(images, "detection", "images"):
            tokens, probs = self._generate(
                [_Image(t, prompt) for t in chunk], 1, "detection", config
            )
            for row_tokens, row_probs in zip(tokens[:, 0], probs[:, 0], strict=True):
                decoded, _ = codec.decode(row_tokens, row_probs)
                order = np.argsort(-decoded["score"], kind="stable")
                found.append(
                    {
                        "boxes": decoded["bbox"][order],
                        "labels": decoded["label"][order],
                        "scores": decoded["score"][order],
                    }  # fmt: skip
                )
        return found

    def _ground_truth_boxes(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        objects = example["objects"]
        keep = ~np.asarray(objects["is_crowd"], bool).reshape(-1)
        boxes = np.clip(np.asarray(objects["bbox"], np.float32).reshape(-1, 4)[keep], 0, 1)
        labels = np.asarray(objects["label"], np.int64).reshape(-1)[keep]
        return {"boxes": boxes, "labels": labels, "scores": np.ones(len(labels), np.float32)}

    def _segment(self, examples, images, found) -> list[list]:
        codec = self.tasks["segmentation"]
        rows = self.options.max_instances
        config = _decode_config(
            codec.seq_len - codec.PROMPT_LENGTH, self.options.segmentation_top_p
        )
        prompted = []
        for tokens, f in zip(images, found, strict=True):
            prompts = [codec.prompt(box, label) for box, label in zip(
                f["boxes"][:rows], f["labels"][:rows], strict=True)]  # fmt: skip
            empty = np.zeros((0, codec.PROMPT_LENGTH), np.int32)
            prompted.append(_Image(tokens, np.stack(prompts) if prompts else empty))
        masks = []
        for chunk_index, chunk in enumerate(self._chunks(prompted, "segmentation", "images")):
            start = chunk_index * self.options.images_per_batch
            # Each sample is one decoder call with all boxes' rows (the image encoded once per
            # call). All samples as extra rows of one call measured only 7% faster on CPU
            # (experiments/benchmarks/README.md) for a KV cache segm_samples times larger.
            samples = [
                self._generate(chunk, rows, "segmentation", config)[0]
                for _ in range(self.options.segm_samples)
            ]  # each [b, R, max_len]
            for offset, image in enumerate(chunk):
                height, width = np.asarray(examples[start + offset]["image"]).shape[:2]
                image_masks: list = [None] * len(found[start + offset]["labels"])
                for row in range(len(image.prompts)):
                    polygons = [codec.decode(sample[offset, row])[0] for sample in samples]
                    sampled = np.stack(
                        [mask_utils.decode(polygons_to_rle(p, height, width)) for p in polygons]
                    )  # [N, H, W]
                    binary = np.asfortranarray(average_masks(sampled).astype(np.uint8))
                    image_masks[row] = mask_utils.encode(binary)
                masks.append(image_masks)
        return masks

    def _keypoints(self, examples, found) -> list[np.ndarray]:
        codec = self.tasks["keypoints"]
        config = _decode_config(RESPONSE_LENGTH, self.options.keypoints_top_p)
        crops, owners = [], []  # one packed image per person crop; (image index, box index)
        for index, (example, f) in enumerate(zip(examples, found, strict=True)):
            image, _ = patches.standardize_pixels(example["image"], int(example["image_id"]))
            for box_index in range(min(len(f["labels"]), self.options.max_instances)):
                label = int(f["labels"][box_index])
                if label not in self.keypoint_labels:
                    continue
                crop = codec.crop_box(f["boxes"][box_index], image.shape[:2])
                prompt = codec.prompt(f["boxes"][box_index], label, crop)[None]
                tokens = self._image_tokens(crop_image(image, crop), int(example["image_id"]))
                crops.append(_Image(tokens, prompt))
                owners.append((index, box_index, crop))
        keypoints = [np.zeros((len(f["labels"]), NUM_KEYPOINTS, 3), np.float32) for f in found]
        decoded_rows = []
        for chunk in self._chunks(crops, "keypoints", "person crops"):
            decoded_rows.extend(self._generate(chunk, 1, "keypoints", config)[0][:, 0])
        for (index, box_index, crop), row in zip(owners, decoded_rows, strict=True):
            keypoints[index][box_index] = codec.decode(row, crop)[0]
        return keypoints

    def _caption(self, images) -> list[str]:
        codec = self.tasks["captioning"]
        config = _decode_config(codec.seq_len - codec.PROMPT_LENGTH, 0.0)
        prompt = np.array([[codec.vocab.CAPTION_PROMPT]], np.int32)
        captions = []
        for chunk in self._chunks(images, "captioning", "images"):
            tokens, _ = self._generate([_Image(t, prompt) for t in chunk], 1, "captioning", config)
            captions.extend(codec.decode(row)[0] for row in tokens[:, 0])
        return captions

    def predict(self, examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Decoded examples (navit_seq.data.sources) -> one prediction dict per example."""
        images = []
        for example in examples:
            pixels, _ = patches.standardize_pixels(example["image"], int(example["image_id"]))
            images.append(self._image_tokens(pixels, int(example["image_id"])))
        predictions = [{"image_id": int(e["image_id"])} for e in examples]
        if self.options.use_gt_boxes:
            found = [self._ground_truth_boxes(e) for e in examples]
        elif "detection" in self.tasks:
            found = self._detect(examples, images)
        else:
            found = None
        if found is not None:
            for prediction, f in zip(predictions, found, strict=True):
                prediction.update(f)
        if "segmentation" in self.tasks:
            for prediction, masks in zip(predictions, self._segment(examples, images, found),
                                         strict=True):  # fmt: skip
                prediction["masks"] = masks
        if "keypoints" in self.tasks:
            for prediction, points in zip(predictions, self._keypoints(examples, found),
                                          strict=True):  # fmt: skip
                prediction["keypoints"] = points
        if "captioning" in self.tasks:
            for prediction, caption in zip(predictions, self._caption(images), strict=True):
                prediction["caption"] = caption
        return predictions


def evaluation_examples(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The first `evaluation.num_images` decoded examples (0 = all) of the evaluation split."""
    from navit_seq.data import sources

    options = config.get("evaluation", default_evaluation_config())
    split = options.split or config.data.eval_split
    source = sources.data_source(config.data.name, split, data_dir=config.data.data_dir)
    count = len(source) if not options.num_images else min(options.num_images, len(source))
    return [source[i] for i in range(count)]


def evaluate_split(config: ml_collections.ConfigDict, model: Any) -> dict[str, float]:
    """Predictions on the evaluation split scored with pycocotools and pycocoevalcap:
    bbox_AP, bbox_AP50, segm_AP, keypoints_AP, caption_BLEU4, caption_CIDEr (+ counts).
    A metric of a task the recipe does not train reads 0.0 with `<kind>_num_predictions` 0."""
    from navit_seq.data import sources
    from navit_seq.evaluation import captions, coco

    examples = evaluation_examples(config)
    predictions = Predictor(config, model).predict(examples)
    class_names = sources.class_names(config.data.name, data_dir=config.data.data_dir)
    metrics = coco.coco_metrics(examples, predictions, class_names)
    references = {int(e["image_id"]): list(e["captions"]) for e in examples}
    predicted = {
        p["image_id"]: p["caption"]
        for p in predictions
        if "caption" in p and any(str(c).strip() for c in references[p["image_id"]])
    }
    metrics.update(captions.caption_metrics(references, predicted))
    metrics["num_images"] = float(len(examples))
    return metrics
