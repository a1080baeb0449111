"""Pictures of a trained Pix2Seq model's predictions on any image.

`python -m navit_seq.predict --workdir DIR --image PATH [--task all] [--output OUT]` restores
DIR's latest checkpoint (the recipe is DIR/config.json, written by `navit_seq.main`), runs the
chosen tasks on the image (`navit_seq.inference`) and saves OUT.png (boxes with class and
score, masks, keypoint skeletons and the caption drawn at the image's native resolution) and
OUT.json (the predictions: normalized (y, x) coordinates, COCO RLE masks).
"""

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from navit_seq import cli  # noqa: E402

TASKS = ("detection", "segmentation", "keypoints", "captioning")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Any PIL-readable image (PNG, JPEG, ...) as uint8 RGB [H, W, 3]."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))  # [H, W, 3]; drops alpha, expands grey
    except (FileNotFoundError, UnidentifiedImageError) as error:
        raise ValueError(f"--image {path}: cannot read an image there ({error}).") from error


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
    every task of the recipe). Segmentation and keypoints also run detection: its boxes are
    their prompts (and are kept in the prediction)."""
    from navit_seq import inference
    from navit_seq.data import mixing

    trained = [name for name, _ in mixing.task_weights(config.data)]
    wanted = trained if task == "all" else [task]
    if task in ("segmentation", "keypoints") and "detection" in trained:
        wanted = ["detection", task]
    missing = sorted(set(wanted) - set(trained))
    if missing:
        raise ValueError(
            f"--task {task}: the recipe in the workdir trains {trained}, not {missing}; "
            "pick one of those or --task all."
        )
    config = ml_collections.ConfigDict(config.to_dict())  # a copy: the caller's stays as it is
    config.data.tasks = tuple((name, 1.0) for name in wanted)
    return inference.Predictor(config, model).predict([example])[0]


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

    options = config.get("evaluation", inference.default_evaluation_config())
    split = options.get("split") or config.data.eval_split
    source = sources.data_source(config.data.name, split, data_dir=config.data.data_dir)
    examples = [source[i] for i in range(min(num_images, len(source)))]
    predictions = inference.Predictor(config, model).predict(examples)
    if jax.process_index() != 0:
        return os.fspath(path)
    names = sources.class_names(config.data.name, data_dir=config.data.data_dir)
    return draw.save_prediction_grid(examples, predictions, names, path)


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
    parser.add_argument("--image", required=True, help="an image file (PNG, JPEG, ...)")
    parser.add_argument("--task", default="all", choices=(*TASKS, "all"),
                        help="which task to run (default: all four)")  # fmt: skip
    parser.add_argument("--output", default=None,
                        help="output path without extension (default: WORKDIR/predictions/"
                        "<image name>); writes OUTPUT.png and OUTPUT.json")  # fmt: skip
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="draw only objects scoring at least this (default: 0)")  # fmt: skip
    cli.add_verbose_argument(parser)
    cli.add_quiet_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from navit_seq.data import sources
    from navit_seq.evaluation import draw

    workdir = Path(args.workdir)
    image = load_image(args.image)
    config, model = restore_model(workdir, args.step)
    prediction = predict(model, config, image_example(image), args.task)
    names = sources.class_names(config.data.name, config.data.data_dir)
    output = Path(args.output or workdir / "predictions" / Path(args.image).stem)
    output.parent.mkdir(parents=True, exist_ok=True)
    picture = draw.draw_prediction(image, prediction, names, min_score=args.min_score)
    png, json_path = Path(f"{output}.png"), Path(f"{output}.json")
    picture.save(png)
    json_path.write_text(json.dumps(to_json(prediction), indent=1) + "\n")
    print(f"Saved {png} and {json_path}")
    return 0


if __name__ == "__main__":
    cli.enable_compilation_cache(cli.default_compilation_cache_dir())
    cli.run(main)
