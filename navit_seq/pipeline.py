"""The grain input pipeline: decoded examples -> per-image tokens (in workers) -> packed batches.

    source[process_index::process_count] -> shuffle -> repeat -> [task choice] -> task
    encoding, resolution, patchify (grain RandomMap, in `num_workers` worker processes) ->
    PackIterDataset (main process: token dropping + packing) -> batches of architecture.md §3

Several tasks (`data.tasks`) are mixed per example or per batch (`navit_seq.data.mixing`).
Each task says which packed images an example becomes (`Task.views`: the whole image, or
keypoints' one crop per person); `image_tokens` turns each into tokens, here and at inference.

Per host: each process reads the records `process_index::process_count` of the source and packs
its own `batch_size / process_count` rows; the trainer assembles them into global arrays. This
module never imports JAX (grain workers import it), so the caller passes the process index.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from navit_seq import cli, tasks
from navit_seq.data import augment, mixing, packing, patches, resolution, token_drop
from navit_seq.data import token_labels as token_labels_lib


def default_data_config() -> ml_collections.ConfigDict:
    """Data fields of architecture.md §6 with NaViT's pretraining defaults; recipes extend it."""
    return ml_collections.ConfigDict(
        {
            "name": "scenes",
            "data_dir": "datasets",
            "train_split": "train",
            "eval_split": "validation",
            "seed": 0,
            "shuffle": True,
            "num_epochs": None,  # training repeats forever; evaluation reads one epoch
            "patch_size": 16,
            "seq_len": 256,  # L: NaViT-B/16 pretraining packs 256 tokens (Table 2)
            "batch_size": 32,  # B: global rows; each host packs batch_size / process_count
            "max_examples_per_seq": 8,  # E_max: pooled slots per row
            "packing": True,  # False: one image per row, padded (the ablation baseline)
            "pack_buffer_size": 64,  # look-ahead images that wait for a later batch
            "num_workers": 1,  # grain worker processes for the per-image work
            "worker_threads": 1,  # reader threads per worker (the machine has 2 cores)
            # MiB of decoded training examples each process keeps (sources.CachedSource):
            # later epochs skip record parsing and image decoding. 0: decode every time.
            "source_cache_mb": 0,
            "worker_buffer_size": 64,  # per-image elements each worker prefetches
            "resolution": resolution.default_resolution_config(),
            "augment": augment.default_augment_config(),  # training only (flips)
            "eval_max_tokens": 256,  # evaluation: largest size with at most this many tokens
            # Evaluation at a fixed test resolution: > 0 resizes each image's longer side to
            # this many pixels (shrunk to eval_max_tokens if larger); 0: the token budget.
            "eval_side": 0,
            # Longest image side in patches (0: no limit); keep <= model.posemb.max_len so a
            # learned position table is never indexed out of range.
            "max_grid_side": 64,
            "token_drop": token_drop.default_token_drop_config(),
            # Per-slot label grids of the class under each patch (navit_seq.data.token_labels),
            # for the sequence objective's `loss.token_label_weight`; needs max_grid_side > 0.
            "token_labels": False,
            "task": {"name": "classification", "num_classes": 0},  # 0: read from the source
            # Multi-task: ((task name, weight), ...) sharing data.task's options; empty: data.task.
            "tasks": (),
            "mixing": "batch",  # "batch": one task per batch (Pix2Seq v2); "data": per example
            "max_rows_per_seq": 16,  # R_max: decoder rows per packed row (sequence tasks)
            "text_seq_len": 64,  # L_text: caption tokens per packed row (image_text task)
        }
    )


def get_config() -> ml_collections.ConfigDict:
    """Lets a command line name this module as its config: `--config navit_seq/pipeline.py`."""
    return default_data_config()


def validate_data_config(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
    """Raise a ValueError naming the field and the fix for an inconsistent configuration."""
    resolution.validate_resolution_config(config.resolution)
    augment.validate_augment_config(config.get("augment", augment.default_augment_config()))
    token_drop.validate_token_drop_config(config.token_drop)
    if config.batch_size % process_count:
        raise ValueError(
            f"data.batch_size={config.batch_size} is not divisible by the {process_count} "
            "processes; each host packs batch_size / process_count rows."
        )
    if config.max_examples_per_seq < 1 or config.seq_len < 1:
        raise ValueError(
            f"data.max_examples_per_seq={config.max_examples_per_seq}, data.seq_len="
            f"{config.seq_len}; both must be at least 1."
        )
    if config.max_grid_side < 0:
        raise ValueError(
            f"data.max_grid_side={config.max_grid_side}; use 0 (no limit) or the model's "
            "model.posemb.max_len."
        )
    if config.get("token_labels", False) and config.max_grid_side < 1:
        raise ValueError(
            "data.token_labels=True labels a grid of data.max_grid_side patches per side, but "
            "data.max_grid_side=0 (no limit); set it to the model's model.posemb.max_len."
        )
    if not 0 < config.eval_max_tokens <= config.seq_len:
        raise ValueError(
            f"data.eval_max_tokens={config.eval_max_tokens}; use 1..seq_len={config.seq_len}."
        )
    if config.get("eval_side", 0) < 0:
        raise ValueError(
            f"data.eval_side={config.eval_side}; use 0 (the token budget) or a longer side in "
            "pixels."
        )
    mixing.validate_mixing_config(config)


# Examples read, evenly spread over a split, to find what each task learns from: enough to
# meet a kind of annotation that one image in a few dozen holds, and quick (images stay encoded).
ANNOTATION_SAMPLE = 256


def dataset_problems(config: ml_collections.ConfigDict, splits: Mapping[str, str]) -> list[str]:
    """Everything the dataset of the data config `config` cannot serve, one item per problem
    naming the config key to change ([] = none): the data config's own errors, each task
    (its tokenizer, options and class count), the splits the command reads (`splits`:
    {config key: split}, e.g. {"data.eval_split": "validation"}) and whether each holds what
    each task learns from (`Task.annotations`, looked for in up to ANNOTATION_SAMPLE examples
    read evenly over the split). Lets a command fail before its first step, not at the final
    evaluation. The dataset must exist (FileNotFoundError naming the build command if not)."""
    from navit_seq.data import sources

    available = sources.split_names(config.name, config.data_dir)
    problems = []
    try:
        validate_data_config(config)
        names = [name for name, _ in mixing.task_weights(config)]
    except ValueError as error:
        problems.append(str(error))
        names = []
    task_list = []
    for name in names:
        try:
            task_list.append(tasks.get_task(tasks.task_config(config, name)))
        except (ValueError, OSError) as error:
            problems.append(str(error))
    lacking: dict[str, list[str]] = {}  # task name -> where its annotations were not found
    for key, split in splits.items():
        base, reason = split.split("[", 1)[0], ""
        if base not in available:
            problems.append(
                f"{key}={split!r} is not a split of the dataset (it has {', '.join(available)}); "
                f"set {key} to one of them"
            )
            continue
        try:  # an empty slice ("train[:0]") fails in ArrayRecord, a malformed one in TFDS
            source = sources.data_source(config.name, split, config.data_dir, decode_images=False)
        except ValueError as error:
            source, reason = [], f" ({cli.one_line(error)})"
        if not len(source):
            problems.append(
                f"{key}={split!r} selects no examples{reason}; select some, e.g. {base!r} or "
                f"{base + '[:32]'!r}"
            )
            continue
        sample = np.unique(np.linspace(0, len(source) - 1, ANNOTATION_SAMPLE).astype(int))
        missing = list(task_list)
        for index in sample:
            example = source[int(index)]
            missing = [task for task in missing if not task.annotations.present(example)]
            if not missing:
                break
        for task in missing:
            lacking.setdefault(task.name, []).append(f"{split!r} ({key}, {len(sample)} read)")
    task_key = "data.tasks" if config.get("tasks") else "data.task.name"
    problems += [
        f"task {task.name!r} ({task_key}) learns from {task.annotations.description}, found in "
        f"none of the examples read from {' and '.join(lacking[task.name])}; drop it from "
        f"{task_key} or use a dataset that has them"
        for task in task_list
        if task.name in lacking
    ]
    return problems


class AddIndex(grain.transforms.MapWithIndex):
    """Store the element's index in the dataset under `key` (picklable for grain workers)."""

    def __init__(self, key: str):
        self.key = key

    def map_with_index(self, index: int, element: dict) -> dict:
        return {**element, self.key: index}


def image_tokens(
    image: np.ndarray,
    resolution_config: ml_collections.ConfigDict,
    patch_size: int,
    max_tokens: int,
    max_grid_side: int,
    rng: np.random.Generator,
    counts: dict[str, int],
) -> dict[str, np.ndarray]:
    """Standardized pixels [H, W, 3] -> the per-image token fields of architecture.md §2:
    resized to a grid drawn from `resolution_config` (at most `max_tokens` patches) and
    patchified. Adds the resize counters to `counts`. Training, inference and predict call it."""
    height, width = image.shape[:2]
    rows, cols, size_counts = resolution.sample_grid(
        resolution_config, height, width, patch_size, max_tokens, rng, max_grid_side=max_grid_side
    )
    for key, count in size_counts.items():
        counts[key] = counts.get(key, 0) + count
    image = resolution.resize_image(image, rows * patch_size, cols * patch_size)
    image_patches, patch_coords, image_grid = patches.patchify(image, patch_size)
    return {
        "patches": image_patches,  # [N, P*P*3] uint8
        "patch_coords": patch_coords,  # [N, 2] int32
        "image_grid": image_grid,  # [2] int32
        "image_size": np.array(image.shape[:2], np.int32),
        "original_size": np.array([height, width], np.int32),  # of the example or its crop
    }


class PrepareImage(grain.transforms.RandomMap):
    """Decoded example -> `{images: [per-image elements of architecture.md §2], counts, ...}`.

    The task is `task_list[element["task_index"]]` (0 without mixing); it encodes the example
    and says which packed images it becomes (`Task.views`: usually the whole image; keypoints
    one crop per person, none without persons). Ragged groups go under each image's `ragged`.
    """

    def __init__(
        self,
        task_list: Sequence[tasks.Task],
        ragged_names: Sequence[str],
        resolution_config: ml_collections.ConfigDict,
        patch_size: int,
        max_tokens: int,
        max_grid_side: int,
        training: bool,
        flip_probability: float = 0.0,
        token_label_classes: int = 0,
    ):
        """`token_label_classes` > 0: each image carries its token-label grid over that many
        classes (navit_seq.data.token_labels); 0: none."""
        self.task_list = list(task_list)
        self.token_label_classes = token_label_classes
        self.flip_probability = flip_probability if training else 0.0
        self.ragged_names = tuple(ragged_names)
        self.training = training
        self.resolution_config = resolution_config
        self.patch_size = patch_size
        self.max_tokens = max_tokens
        self.max_grid_side = max_grid_side

    def random_map(self, element: dict, rng: np.random.Generator) -> dict[str, Any]:
        example_id = int(element["example_id"])
        task = self.task_list[int(element.get("task_index", 0))]
        image, counts = patches.standardize_pixels(element["image"], example_id)
        element, counts["annotations_clipped"] = resolution.clip_annotations(element)
        element = {**element, "image": image}  # tasks that crop read the standardized pixels
        counts["flipped_left_right"] = int(
            self.flip_probability > 0 and rng.random() < self.flip_probability
        )
        if counts["flipped_left_right"]:
            element = augment.flip_left_right(element)
            image = element["image"]
        targets, task_counts = task.encode(element, training=self.training, rng=rng)
        counts.update(task_counts)
        common = {
            "example_id": np.int64(example_id),
            "task_id": np.int32(task.task_id),
            "stream_index": int(element["stream_index"]),
        }
        images = []
        for pixels, view_targets in task.views(image, targets):
            view_targets = dict(view_targets)
            ragged = {n: view_targets.pop(n) for n in self.ragged_names if n in view_targets}
            tokens = image_tokens(
                pixels,
                self.resolution_config,
                self.patch_size,
                self.max_tokens,
                self.max_grid_side,
                rng,
                counts,
            )
            if self.token_label_classes:
                view_targets[token_labels_lib.TARGET_KEY] = self._token_labels(
                    element, whole_image=pixels is image, image_grid=tokens["image_grid"]
                )
            images.append({**tokens, **common, "targets": view_targets, "ragged": ragged})
        return {"images": images, "counts": counts, **common}

    def _token_labels(self, element: dict, whole_image: bool, image_grid: np.ndarray):
        """[G, G] label grid of one view: IGNORE unless the view shows the example's whole
        image (the boxes' frame) and the example has annotated objects."""
        if not whole_image or "objects" not in element:
            return token_labels_lib.ignored_grid(self.max_grid_side)
        rows, cols = (int(n) for n in image_grid)
        return token_labels_lib.label_grid(
            element["objects"], self.token_label_classes, rows, cols, self.max_grid_side
        )


def host_seed(seed: int, process_index: int, *stream: int) -> int:
    """Seed of one host's shuffle, resolution draws and token drops: independent across hosts
    (and across the per-task streams of batch mixing, `stream`)."""
    return int(np.random.SeedSequence([seed, process_index, *stream]).generate_state(1)[0])


def _shared_specs(
    task_list: Sequence[tasks.Task], config: ml_collections.ConfigDict
) -> tuple[dict, tuple[packing.RaggedSpec, ...]]:
    """(target spec, ragged specs) of a batch holding examples of any of the tasks: the union,
    so every task's batches have the same keys and shapes (nothing recompiles)."""
    target_spec, ragged_specs = {}, {}
    for task in task_list:
        entries = [(target_spec, name, spec) for name, spec in task.target_spec().items()]
        entries += [(ragged_specs, s.name, s) for s in task.ragged_specs(config)]
        for table, name, spec in entries:
            if table.setdefault(name, spec) != spec:
                raise ValueError(
                    f"Task {task.name!r} shapes {name!r} as {spec}, another task of data.tasks "
                    f"as {table[name]}; give them the same data.task options (e.g. seq_len)."
                )
    if config.get("token_labels", False):
        target_spec.update(token_labels_lib.target_spec(config.max_grid_side))
    return target_spec, tuple(ragged_specs.values())


def per_image_dataset(
    source: Sequence[dict],
    config: ml_collections.ConfigDict,
    *,
    train: bool,
    process_index: int = 0,
    process_count: int = 1,
    task_list: Sequence[tasks.Task] | None = None,
    stream: tuple[int, ...] = (),
) -> grain.MapDataset:
    """Random-access dataset of per-image elements for this host (also used to restore state).

    `task_list` (default: all of `data.tasks`, built here) are mixed per example; `stream`
    tells the per-task streams of batch mixing apart (their own shuffle and draws).
    """
    weights = dict(mixing.task_weights(config))
    task_list = recipe_tasks(config) if task_list is None else list(task_list)
    task_names = [task.name for task in task_list]
    seed = host_seed(config.seed, process_index, *stream)
    ds = grain.MapDataset.source(source)
    ds = ds.map_with_index(AddIndex("example_id"))  # the record's index in the whole source
    ds = ds[process_index::process_count].seed(seed)
    if train and config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(config.num_epochs if train else 1)
    if len(task_list) > 1 and train:
        ds = ds.map_with_index(mixing.SampleTask([weights[n] for n in task_names], seed))
    elif len(task_list) > 1:
        ds = mixing.EachTask(ds, len(task_list))
    ds = ds.map_with_index(AddIndex("stream_index"))  # position in this host's stream
    if train:
        resolution_config, max_tokens = config.resolution, config.seq_len
    else:  # evaluation: deterministic, at a fixed side or the largest that fits the budget
        resolution_config = eval_resolution_config(config)
        max_tokens = config.eval_max_tokens
    ragged_names = {spec.name for task in task_list for spec in task.ragged_specs(config)}
    augment_config = config.get("augment", augment.default_augment_config())
    return ds.random_map(
        PrepareImage(
            task_list,
            sorted(ragged_names),
            resolution_config,
            config.patch_size,
            max_tokens,
            config.max_grid_side,
            training=train,
            flip_probability=augment_config.flip_left_right,
            token_label_classes=_token_label_classes(config),
        )
    )


def _token_label_classes(config: ml_collections.ConfigDict) -> int:
    """Classes of the token labels (`data.task.num_classes` or the dataset's); 0 when off."""
    if not config.get("token_labels", False):
        return 0
    return tasks.num_classes(tasks.task_config(config, config.task.name))


def eval_resolution_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The (deterministic) resolution sampler of evaluation: `data.eval_side` or the budget."""
    side = config.get("eval_side", 0)
    if side > 0:  # U(side, side): every longer side is exactly `side` pixels
        fixed = {"kind": "uniform_side", "min_side": side, "max_side": side}
        return ml_collections.ConfigDict({**config.resolution, **fixed})
    return ml_collections.ConfigDict({**config.resolution, "kind": "token_budget"})


def make_dataset(
    source: Sequence[dict],
    config: ml_collections.ConfigDict,
    *,
    train: bool,
    process_index: int = 0,
    process_count: int = 1,
    task_list: Sequence[tasks.Task] | None = None,
) -> grain.IterDataset:
    """The packed-batch grain dataset of `config` (architecture.md §6) over a decoded source.
    `task_list`: the recipe's tasks, built once by the caller (None: built here).

    Training shuffles, repeats `num_epochs` times (None: forever) and drops tokens; evaluation
    reads one epoch in order at the token budget and never drops. Several tasks with
    `data.mixing = "batch"` give a `mixing.BatchMixIterDataset` over one packer per task.
    """
    validate_data_config(config, process_count)
    weights = mixing.task_weights(config)
    all_tasks = recipe_tasks(config) if task_list is None else list(task_list)
    if train and len(weights) > 1 and config.mixing == "batch":
        packers = [
            _packed_dataset(
                source, config, train, process_index, process_count, [task], (k,), all_tasks
            )
            for k, task in enumerate(all_tasks)
        ]
        # The same draw on every host: a global batch is one task across all hosts.
        return mixing.BatchMixIterDataset(packers, [w for _, w in weights], config.seed)
    return _packed_dataset(
        source, config, train, process_index, process_count, all_tasks, (), all_tasks
    )


def recipe_tasks(config: ml_collections.ConfigDict) -> list[tasks.Task]:
    """The tasks of `data.task` / `data.tasks`, built from the data config `config`."""
    return [
        tasks.get_task(tasks.task_config(config, name)) for name, _ in mixing.task_weights(config)
    ]


def split_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    train: bool,
    task_list: Sequence[tasks.Task] | None = None,
) -> grain.IterDataset:
    """`make_dataset` over split `split` of the TFDS dataset `config.name` in `config.data_dir`,
    for this host (JAX's process index and count): what every trainer reads."""
    import jax  # the main process only: grain workers never import JAX through this module

    from navit_seq.data import sources

    cache_mb = config.source_cache_mb if train else 0  # an evaluation pass reads each once
    source = sources.data_source(config.name, split, data_dir=config.data_dir, cache_mb=cache_mb)
    return make_dataset(
        source,
        config,
        train=train,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        task_list=task_list,
    )


def train_batches(
    config: ml_collections.ConfigDict, task_list: Sequence[tasks.Task] | None = None
) -> Iterator:
    """This host's checkpointable iterator over packed batches of `config.train_split`."""
    return iter(split_dataset(config, config.train_split, train=True, task_list=task_list))


def eval_batches(
    config: ml_collections.ConfigDict, task_list: Sequence[tasks.Task] | None = None
) -> grain.IterDataset:
    """One pass over this host's share of `config.eval_split` at the eval token budget (in a
    multi-task recipe, every example once by each task)."""
    return split_dataset(config, config.eval_split, train=False, task_list=task_list)


def check_model_patch_size(patch_size: int, config: ml_collections.ConfigDict, field: str) -> None:
    """Raises unless the model's patch size (config field `field`) equals `config.patch_size`."""
    if patch_size != config.patch_size:
        raise ValueError(
            f"{field}={patch_size} differs from config.data.patch_size={config.patch_size}; "
            "they must be equal."
        )


def _packed_dataset(
    source: Sequence[dict],
    config: ml_collections.ConfigDict,
    train: bool,
    process_index: int,
    process_count: int,
    task_list: Sequence[tasks.Task],
    stream: tuple[int, ...],
    all_tasks: Sequence[tasks.Task],
) -> packing.PackIterDataset:
    """One packer over the examples of `task_list`, with the batch layout of `all_tasks`."""
    images = per_image_dataset(
        source,
        config,
        train=train,
        process_index=process_index,
        process_count=process_count,
        task_list=task_list,
        stream=stream,
    )
    elements = images.to_iter_dataset(
        grain.ReadOptions(num_threads=config.worker_threads, prefetch_buffer_size=16)
    )
    if config.num_workers > 0:
        # grain 0.2.18's mp_prefetch reads an absl flag and fails when the program (a library
        # user, pytest) never parsed flags; their defaults are what we want then.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        elements = elements.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers,
                per_worker_buffer_size=config.worker_buffer_size,
            )
        )
    target_spec, ragged_specs = _shared_specs(all_tasks, config)
    patch_dim = config.patch_size * config.patch_size * patches.NUM_CHANNELS
    return packing.PackIterDataset(
        elements,
        images.__getitem__,
        batch_size=config.batch_size // process_count,
        seq_len=config.seq_len,
        max_examples_per_seq=config.max_examples_per_seq,
        buffer_size=config.pack_buffer_size,
        patch_dim=patch_dim,
        target_spec=target_spec,
        packing=config.packing,
        token_drop_config=config.token_drop if train else None,
        seed=host_seed(config.seed, process_index, *stream),
        ragged_specs=ragged_specs,
    )
