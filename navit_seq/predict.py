"""Pictures of a trained Pix2Seq model's predictions on any image.

`python -m navit_seq.predict --workdir DIR --image PATH [--task all] [--output OUT]` restores
DIR's latest checkpoint (the recipe is DIR/config.json, written by `navit_seq.main`), runs the
chosen task of the recipe (with the tasks it needs, e.g. detection's boxes for segmentation)
or all of them on the image (`navit_seq.inference`) and saves OUT.png (boxes with class and
score, masks, keypoint skeletons and the caption drawn at the image's native resolution) and
OUT.json (the predictions: normalized (y, x) coordinates, COCO RLE masks). `--image` may also
be a folder: every image in it is predicted, into OUT/<name>.{png,json}.

Images are read as they are shown: turned as their EXIF orientation says, greyscale, palette,
CMYK and 16-bit pixels converted to 8-bit RGB, alpha dropped (as the input pipeline does), and
a longer side over MAX_SIDE shrunk to it (JPEGs decoded at a reduced scale), since the model
sees at most `data.eval_max_tokens` patches anyway. A file that cannot be read is one line
naming it and the reason; outputs are written only once complete.
"""

import argparse
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import ExifTags, Image, ImageOps  # noqa: E402

from navit_seq import cli  # noqa: E402

# Longest image side predicted and drawn: native for photos up to 2K; the model sees at most
# data.eval_max_tokens patches (e.g. 100 of 16 px) whatever the size.
MAX_SIDE = 2048
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
TURNING = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded PIL image as uint8 RGB [H, W, 3]; 16-bit pixels scaled to 8 bits (value >> 8,
    as `patches.standardize_pixels` does), alpha dropped."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        pixels = np.asarray(image)  # [H, W] uint16 or int32
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"{image.mode} pixels outside 0..65535 (not a 16-bit image)")
        return np.repeat((pixels.astype(np.uint16) >> 8).astype(np.uint8)[..., None], 3, -1)
    if image.mode == "F":
        raise ValueError("floating-point pixels (mode F); save it as 8- or 16-bit")
    if image.mode == "P" and "transparency" in image.info:  # via RGBA, as PIL asks
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))  # [H, W, 3]


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 RGB [h, w, 3] pixels, the file's (H, W) as oriented) of an image file: turned as
    its EXIF orientation says and shrunk to a longer side of at most MAX_SIDE. Anything that is
    not a readable image raises a ValueError naming the file and the reason."""
    path = Path(path)
    if not path.is_file():
        reason = "a folder, not a file" if path.is_dir() else "no such file"
        raise ValueError(f"--image {path}: {reason}; name an image file or a folder of them.")
    if path.stat().st_size == 0:
        raise ValueError(f"--image {path}: the file is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            # Up to twice PIL's limit an image only warns; it is shrunk right after decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as stored:
                width, height = stored.size
                turned = stored.getexif().get(ExifTags.Base.Orientation, 1) in TURNING
                stored.draft(None, (MAX_SIDE, MAX_SIDE))  # JPEG: decode at 1/2..1/8 scale
                image = ImageOps.exif_transpose(stored)  # a loaded copy, turned upright
        image.thumbnail((MAX_SIDE, MAX_SIDE))  # in place, aspect kept; no-op when smaller
        pixels = _to_rgb(image)
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"--image {path}: {error} Shrink the image first (e.g. to {MAX_SIDE} px)."
        ) from error
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for unreadable files
        raise ValueError(
            f"--image {path}: not a readable image ({cli.one_line(error)})."
        ) from error
    return pixels, (width, height) if turned else (height, width)


def image_example(image: np.ndarray, image_id: int = 0) -> dict[str, Any]:
    """A decoded example (docs/architecture.md §1) holding only the image: no annotations."""
    return {
        "image": image,
        "image_id": np.int64(image_id),
        "objects": {
            "bbox": np.zeros((0, 4), np.float32),
            "label": np.zeros((0,), np.int64),
            "category_id": np.zeros((0,), np.int64),
            "id": np.zeros((0,), np.int64),
            "is_crowd": np.zeros((0,), bool),
            "area": np.zeros((0,), np.float32),
            "mask_rle": np.zeros((0,), object),
            "num_polygons": np.zeros((0,), np.int32),
            "keypoints": np.zeros((0, 17, 3), np.float32),
            "num_keypoints": np.zeros((0,), np.int32),
            "phrase": np.zeros((0,), object),
        },
        "polygon_points": np.zeros((0, 2), np.float32),
        "polygon_sizes": np.zeros((0,), np.int32),
        "captions": np.zeros((0,), object),
    }


def restore_model(workdir: Path, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any]:
    """(recipe, Pix2Seq with the checkpoint's parameters) from a training workdir."""
    from flax import nnx

    from navit_seq.main import check_data, objective_for
    from navit_seq.train import checkpoint as checkpoint_lib
    from navit_seq.train import loop

    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"--workdir {workdir}: no config.json; train there first with `python -m "
            "navit_seq.main --config configs/pix2seq_scenes.py --workdir DIR`."
        )
    try:
        config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    except ValueError as error:
        raise ValueError(
            f"--workdir {workdir}: {config_path} is not valid JSON ({error}); it is written by "
            "navit_seq.main: train there again, or name another --workdir."
        ) from error
    if config.get("trainer") != "sequence":
        raise ValueError(
            f"--workdir {workdir} holds a run of trainer {config.get('trainer')!r} (its "
            "config.json), not a Pix2Seq one: predict draws boxes, masks, keypoints and "
            "captions; name the --workdir of a sequence recipe (e.g. configs/pix2seq_scenes.py)."
        )
    check_data(config)  # the dataset's class names and tokenizer, the evaluation options
    trainer = loop.Trainer(config, objective_for(config))
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", every_steps=0)
    try:
        step, state = checkpointer.restore_state(step, trainer.abstract_state)
    finally:
        checkpointer.close()
    params = state.ema_params if state.ema_params is not None else state.params
    with trainer.context():
        model = nnx.merge(trainer.graphdef, params, state.model_state)
    print(f"Restored step {step} from {workdir / 'checkpoints'}")
    return config, model


def predict(
    model: Any, config: ml_collections.ConfigDict, example: Mapping[str, Any], task: str
) -> dict[str, Any]:
    """The one call into `navit_seq.inference`: the example's predictions for `task` ("all":
    every task of the recipe). A task that needs another's output (segmentation and keypoints
    need boxes) also runs the tasks that provide it; their predictions are kept."""
    from navit_seq import inference
    from navit_seq.data import mixing
    from navit_seq.tasks.sequence import run_order, sequence_tasks

    trained = [name for name, _ in mixing.task_weights(config.data)]
    if task != "all" and task not in trained:
        raise ValueError(
            f"--task {task}: the recipe in the workdir trains {trained}, not {[task]}; "
            "pick one of those or --task all."
        )
    recipe_tasks = sequence_tasks(config.data)
    wanted = {task} if task != "all" else set(trained)
    given = set(inference.ground_truth_keys(inference.evaluation_options(config)))
    for unit in reversed(run_order(recipe_tasks, ())):
        if unit.name in wanted:  # reversed run order: a task before what it needs
            wanted |= {t.name for t in recipe_tasks if set(t.provides) & (set(unit.needs) - given)}
    selected = [unit for unit in recipe_tasks if unit.name in wanted]
    return inference.Predictor(config, model, selected).predict([example])[0]


def save_split_grid(
    config: ml_collections.ConfigDict, model: Any, path: str | os.PathLike, num_images: int = 8
) -> str:
    """A PNG grid of the first `num_images` images of the evaluation split: each one's
    prediction (every task of the recipe) next to its ground truth. Every process predicts
    (the model may be sharded over hosts); process 0 writes. Returns the path."""
    import jax

    from navit_seq import inference
    from navit_seq.data import sources
    from navit_seq.evaluation import draw

    options = inference.evaluation_options(config)
    split = options.get("split") or config.data.eval_split
    source = sources.data_source(config.data.name, split, data_dir=config.data.data_dir)
    examples = [source[i] for i in range(min(num_images, len(source)))]
    predictions = inference.Predictor(config, model).predict(examples)
    if jax.process_index() != 0:
        return os.fspath(path)
    names = sources.class_names(config.data.name, data_dir=config.data.data_dir)
    return draw.save_prediction_grid(
        examples, predictions, names, path, min_score=options.picture_min_score
    )


def to_json(prediction: Mapping[str, Any]) -> dict[str, Any]:
    """Numpy arrays as lists and RLE counts as str, so `json.dumps` takes the prediction."""

    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, np.ndarray | list | tuple):
            return [convert(item) for item in value]
        return value.item() if isinstance(value, np.generic) else value

    return convert(prediction)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m navit_seq.predict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--workdir", required=True, help="training workdir (config.json + checkpoints)"
    )
    parser.add_argument("--image", required=True,
                        help="an image file (PNG, JPEG, ...) or a folder of them")  # fmt: skip
    parser.add_argument("--task", default="all",
                        help="a task of the recipe, e.g. detection (default: all)")  # fmt: skip
    parser.add_argument("--output", default=None,
                        help="output path without extension (default: WORKDIR/predictions/"
                        "<image name>); writes OUTPUT.png and OUTPUT.json. For a folder of "
                        "images: the folder they go to (default: WORKDIR/predictions)")  # fmt: skip
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="draw only objects scoring at least this (default: 0)")  # fmt: skip
    cli.add_verbose_argument(parser)
    cli.add_quiet_argument(parser)
    return parser


def image_files(path: Path) -> list[Path]:
    """`path` itself, or the image files of the folder `path` (by extension, sorted)."""
    if not path.is_dir():
        return [path]
    extensions = set(Image.registered_extensions())
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in extensions)
    if not files:
        raise ValueError(
            f"--image {path}: the folder holds no image files ({', '.join(sorted(extensions))})."
        )
    stems = [f.stem for f in files]
    clashing = sorted({f.name for f in files if stems.count(f.stem) > 1})
    if clashing:
        raise ValueError(
            f"--image {path}: {', '.join(clashing)} would write the same outputs "
            "(<name>.png, <name>.json); rename them or predict them one at a time."
        )
    return files


def write_outputs(output: Path, picture: Image.Image, prediction: Mapping[str, Any]) -> None:
    """OUTPUT.png and OUTPUT.json, each written whole under a temporary name and then renamed
    into place, so a failure never leaves half a file behind."""
    output.parent.mkdir(parents=True, exist_ok=True)
    finals = {suffix: Path(f"{output}{suffix}") for suffix in (".json", ".png")}
    partials = {suffix: Path(f"{path}.partial") for suffix, path in finals.items()}
    try:
        partials[".json"].write_text(json.dumps(to_json(prediction), indent=1) + "\n")
        picture.save(partials[".png"], format="PNG")
        for suffix, partial in partials.items():
            os.replace(partial, finals[suffix])
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workdir, source = Path(args.workdir), Path(args.image)
    files, folder = image_files(source), source.is_dir()
    # A single image is read before TensorFlow and the model load, so a bad one fails at once.
    first = None if folder else load_image(source)
    from navit_seq.data import sources
    from navit_seq.evaluation import draw

    config, model = restore_model(workdir, args.step)
    names = sources.class_names(config.data.name, config.data.data_dir)
    outputs = Path(args.output or workdir / "predictions" / ("" if folder else source.stem))
    progress, failed = cli.Progress("predict", total=len(files), unit="images"), []
    for done, path in enumerate(files, 1):
        try:
            image, size = first or load_image(path)
        except ValueError as error:  # in a folder: named, and the other images still predicted
            print(f"skipped {error}", file=sys.stderr, flush=True)
            failed.append(path)
            continue
        prediction = predict(model, config, image_example(image), args.task)
        picture = draw.draw_prediction(image, prediction, names, min_score=args.min_score)
        output = outputs / path.stem if folder else outputs
        write_outputs(output, picture, prediction)
        read_at = f" (read at {image.shape[0]}x{image.shape[1]} of {size[0]}x{size[1]} pixels)"
        print(f"Saved {output}.png and {output}.json{read_at if image.shape[:2] != size else ''}")
        progress.update(done)
    progress.close()
    if failed:
        raise ValueError(
            f"--image {source}: {len(failed)} of {len(files)} images were not predicted (each "
            f"named above); the other {len(files) - len(failed)} are in {outputs}."
        )
    return 0


if __name__ == "__main__":
    cli.enable_compilation_cache(cli.default_compilation_cache_dir())
    cli.run(main)
