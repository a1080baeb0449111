"""What the builders share: the dataset-name check, one TFDS builder class per dataset name,
"build once, then read the build report" (coco.py, image_text.py), and progress lines."""

import json
import os
import re
import types
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import tensorflow_datasets as tfds

from navit_seq import cli

Item = TypeVar("Item")

REPORT_FILE = "build_report.json"  # per-split counts, skips and adjustments, in the dataset dir


def check_dataset_name(name: str, error: type[Exception]) -> None:
    """Raises `error` unless `name` is a valid TFDS dataset name (lower_snake_case)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise error(
            f"name={name!r} is not a valid TFDS dataset name; use lower_snake_case "
            "(letters, digits, underscores, starting with a letter)."
        )


def named_builder(
    base: type[tfds.core.GeneratorBasedBuilder], name: str, **kwargs: Any
) -> tfds.core.GeneratorBasedBuilder:
    """An instance of a subclass of `base` whose dataset is called `name`, writing ArrayRecord.

    One class per dataset name, since TFDS keeps a builder's name on its class.
    """
    builder_class = types.new_class(
        f"{base.__name__}_{name}",
        (base,),
        {"skip_registration": True},
        lambda namespace: namespace.update(name=name),
    )
    # ArrayRecord: random access for tfds.data_source + grain.
    return builder_class(file_format="array_record", **kwargs)


def prepare_and_report(
    builder: tfds.core.GeneratorBasedBuilder, name: str, error: type[Exception]
) -> dict[str, Any]:
    """Builds the dataset unless it exists; returns its build report with where it lives."""
    already_built = builder.is_prepared()
    if not already_built:
        builder.download_and_prepare()
    report_path = os.path.join(builder.data_dir, REPORT_FILE)
    if not os.path.exists(report_path):
        raise error(
            f"{builder.data_dir} holds a dataset {name!r} without {REPORT_FILE}; it was not "
            "built by this builder. Delete that folder or choose another --name."
        )
    with open(report_path) as f:
        report = json.load(f)
    return {**report, "dataset_dir": str(builder.data_dir), "already_built": already_built}


def with_progress(items: Iterable[Item], split: str, total: int) -> Iterator[Item]:
    """`items` (a split's examples as TFDS pulls them), with a `navit_seq.cli.Progress` line
    `build <split>: done/total examples, rate, ETA` while they are written."""
    progress = cli.Progress(f"build {split}", total=total, unit="examples")
    for done, item in enumerate(items, 1):
        yield item
        progress.update(done)
    progress.close()
