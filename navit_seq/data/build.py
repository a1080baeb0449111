"""Build datasets: `python -m navit_seq.data.build {scenes,coco,image-text} --data-dir DIR ...`.

`scenes` draws the bundled scene dataset; `coco` converts a local COCO-format folder;
`image-text` a local folder of (image, caption) pairs (see --help). All
write TFDS ArrayRecord datasets that `navit_seq.data.sources.data_source` reads, print where
they wrote, and with `--show N` print N examples and save a picture of their annotations.
"""

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from navit_seq import cli

# TensorFlow-heavy modules (sources, features, builders) are imported inside the functions that
# use them: scene-drawing worker processes (multiprocessing spawn) re-import this module as
# their __main__ and need none of them.

SCENE_DEFAULTS = {
    "train_size": 10_000,
    "validation_size": 1_000,
    "heldout_size": 1_000,
    "seed": 0,
    "min_side": 48,
    "max_side": 640,
    "vocab_size": 512,
}
SCENE_HELP = {
    "train_size": "scenes in split train",
    "validation_size": "scenes in split validation (seen colour-shape combinations)",
    "heldout_size": "scenes in split heldout (only combinations train never shows)",
    "seed": "every scene is drawn from (seed, split, index)",
    "min_side": "smallest image side in pixels",
    "max_side": "largest image side in pixels",
    "vocab_size": "SentencePiece vocabulary size (at most; small corpora give fewer)",
}
# The names of builders.scenes.VARIANTS, kept here so `--help` imports no TensorFlow.
SCENE_VARIANTS = ("scenes", "scene_shapes", "scenes_easy", "scene_textures")
PICTURES_PER_ROW = 4  # in the sample picture of `--show`


def build_scenes(
    data_dir: str | os.PathLike,
    num_workers: int | None = None,
    variant: str = "scenes",
    **options,
) -> str:
    """Builds the scene dataset `variant` (a name in builders.scenes.VARIANTS) in `data_dir`
    unless it is already there; returns its folder.

    `options` override SCENE_DEFAULTS (sizes, seed, side range, vocab size). A dataset already
    built there with other options is an error, never silently reused or overwritten.
    """
    from navit_seq.data.builders import scenes

    unknown = sorted(set(options) - set(SCENE_DEFAULTS))
    if unknown:
        raise TypeError(f"build_scenes: unknown options {unknown}; known: {list(SCENE_DEFAULTS)}.")
    if variant not in scenes.VARIANTS:
        raise ValueError(f"build_scenes: variant={variant!r}; use one of {list(scenes.VARIANTS)}.")
    builder = scenes.VARIANTS[variant](
        data_dir=os.fspath(data_dir), num_workers=num_workers, **{**SCENE_DEFAULTS, **options}
    )
    wanted = builder.generation_parameters()
    if builder.is_prepared():
        built = scenes.read_report(builder.data_dir)
        built_parameters = {key: built.get(key) for key in wanted}
        if built_parameters != wanted:
            raise ValueError(
                f"build_scenes: {builder.data_dir} holds a scene dataset built with "
                f"{built_parameters}, not the requested {wanted}. Use another --data-dir or "
                "delete that folder."
            )
        return os.fspath(builder.data_dir)
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)


def describe(example: dict[str, Any], names: Sequence[str]) -> str:
    """A few readable lines about one decoded example."""
    height, width = example["image"].shape[:2]
    objects = example["objects"]
    lines = [f"image {int(example['image_id'])}: {height}x{width}, {len(objects['label'])} objects"]
    for i, label in enumerate(objects["label"]):
        ymin, xmin, ymax, xmax = objects["bbox"][i]
        lines.append(
            f"  {names[label]:<9} box (y,x) ({ymin:.2f},{xmin:.2f})-({ymax:.2f},{xmax:.2f}) "
            f"area {objects['area'][i]:.0f}px polygons {objects['num_polygons'][i]} "
            f"keypoints {objects['num_keypoints'][i]}  {objects['phrase'][i]!r}"
        )
    lines += [f"  caption: {caption}" for caption in example["captions"]]
    return "\n".join(lines)


def print_sample(
    name: str, split: str, data_dir: str | os.PathLike, num: int, picture_path: str | None = None
) -> str:
    """Prints `num` examples of the dataset and saves their annotations drawn in one PNG."""
    from navit_seq.data import drawing, sources

    source = sources.data_source(name, split, data_dir)
    names = sources.class_names(name, data_dir)
    pictures = []
    for index in range(min(num, len(source))):
        example = source[index]
        print(describe(example, names))
        pictures.append(drawing.draw_annotations(example, names))
    if not pictures:
        raise ValueError(f"print_sample: split {split!r} of {name!r} has no examples to show.")
    rows = [pictures[i : i + PICTURES_PER_ROW] for i in range(0, len(pictures), PICTURES_PER_ROW)]
    picture_path = picture_path or os.path.join(os.fspath(data_dir), f"{name}_{split}_samples.png")
    drawing.save_grid(rows, picture_path)
    print(f"saved a picture of {len(pictures)} annotated examples to {picture_path}")
    return picture_path


def split_folder(value: str) -> tuple[str, str]:
    """`--image-dir SPLIT=FOLDER` as (split, folder)."""
    split, equals, folder = value.partition("=")
    if not equals or not split or not folder:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not SPLIT=FOLDER; write e.g. --image-dir train2017=/data/coco/train"
        )
    return split, folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m navit_seq.data.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`python -m navit_seq.data.build COMMAND --help` lists that command's options "
        "and their defaults.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults_shown = argparse.ArgumentDefaultsHelpFormatter
    scenes = commands.add_parser(
        "scenes",
        help="draw the bundled scene dataset (no download)",
        formatter_class=defaults_shown,
    )
    scenes.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    for option, default in SCENE_DEFAULTS.items():
        scenes.add_argument(
            f"--{option.replace('_', '-')}", type=int, default=default, help=SCENE_HELP[option]
        )
    scenes.add_argument(
        "--num-workers", type=int, default=None, help="processes drawing scenes (None: up to 2)"
    )
    scenes.add_argument(
        "--variant",
        choices=SCENE_VARIANTS,
        default="scenes",
        help="scenes: 1-10 objects on textured backgrounds (every task); scene_shapes: one "
        "large object (shape classification); scenes_easy: 1-3 large objects on plain "
        "backgrounds (the quickstart); scene_textures: one large shape filled with one of 12 "
        "fine or coarse textures, labelled by texture (texture classification). The variant is "
        "also the dataset's name (data.name)",
    )
    coco = commands.add_parser(
        "coco", help="convert a local COCO-format folder", formatter_class=defaults_shown
    )
    coco.add_argument("--coco-dir", required=True, help="folder with images and annotations/")
    coco.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    coco.add_argument("--name", default="coco_format", help="TFDS dataset name to give it")
    coco.add_argument(
        "--image-dir",
        type=split_folder,
        action="append",
        default=[],
        metavar="SPLIT=FOLDER",
        help="the folder a split's file_names are relative to, if not COCO_DIR/SPLIT, "
        "COCO_DIR/images/SPLIT, COCO_DIR/images or COCO_DIR (repeat for each split)",
    )
    image_text = commands.add_parser(
        "image-text",
        help="convert a local folder of (image, caption) pairs",
        formatter_class=defaults_shown,
    )
    image_text.add_argument(
        "--folder", required=True, help="folder with images and captions_<split>.jsonl files"
    )
    image_text.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    image_text.add_argument("--name", default="image_text", help="TFDS dataset name to give it")
    for command in (scenes, coco, image_text):
        command.add_argument(
            "--show", type=int, default=0, metavar="N", help="print N examples, save a picture"
        )
        command.add_argument("--show-split", default=None, help="split to show (None: the first)")
        cli.add_verbose_argument(command)
        cli.add_quiet_argument(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # the builders report progress lines of their own (cli.Progress)
    if args.command == "scenes":
        options = {option: getattr(args, option) for option in SCENE_DEFAULTS}
        start = time.perf_counter()
        dataset_dir = build_scenes(
            args.data_dir, num_workers=args.num_workers, variant=args.variant, **options
        )
        seconds = time.perf_counter() - start
        name, first_split = args.variant, "train"
        with open(os.path.join(dataset_dir, "build_report.json")) as f:
            print(json.dumps(json.load(f), indent=1))
        print(f"scene dataset in {dataset_dir} (tokenizer: {dataset_dir}/sentencepiece.model)")
        print(f"ready after {seconds:.1f} s (a dataset already built is reused, not redrawn)")
    else:
        if args.command == "coco":
            from navit_seq.data.builders import coco

            report = coco.build(
                args.coco_dir, args.data_dir, name=args.name, image_dirs=dict(args.image_dir)
            )
        else:
            from navit_seq.data.builders import image_text

            report = image_text.build(args.folder, args.data_dir, name=args.name)
        name, first_split = args.name, next(iter(report["splits"]))
        print(json.dumps(report, indent=1))
        print(f"{args.command} dataset {args.name!r} in {report['dataset_dir']}")
    if args.show:
        print_sample(name, args.show_split or first_split, args.data_dir, args.show)
    return 0


if __name__ == "__main__":
    cli.run(main)
