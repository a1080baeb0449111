"""One training step of the NaViT classifier on a shared workload, against the peer NaViT.

Measures, in one invocation and on the same images:
- the packed step: the trainer's own compiled step (`navit_seq.train.loop.Trainer`: forward +
  backward + AdamW + its metrics) of the classification objective (NaViT classifier, sigmoid
  CE, MAP head) on the workload's images packed into [B, seq_len] sequences;
- the fixed-length step: the same step and shapes with one full-length image per row (XLA
  attention), so packed_step_s / fixed_len_step_s is the cost of packing;
- the peer step: lucidrains' vit-pytorch NaViT (same width/depth/heads/mlp/patch, AdamW,
  grouping by max_seq_len = seq_len) on CPU torch;
- the fp32 matmul peak of this machine, to turn FLOP/s into model-FLOPs utilisation.

    python experiments/benchmarks/train_step.py --workload ../shared/bench/navit_s16_train.json

Prints a human-readable summary, then one JSON line of results last.
"""

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import flops as flop_count  # experiments/benchmarks/flops.py, next to this script
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from navit_seq import config_common, cpu_runtime
from navit_seq.data import packing, patches
from navit_seq.models import attention, navit
from navit_seq.train import classification, loop

Batch = dict[str, Any]  # a packed batch: arrays, and `targets` {"labels": [B, E, C]}
LEARNING_RATE = 1e-3  # any value: the benchmark times the update, it does not train
WEIGHT_DECAY = 1e-4


# ----------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """The shared workload file: model sizes, sequence shape and the image sizes (H, W)."""

    patch_size: int
    channels: int
    seq_len: int
    max_examples_per_seq: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_classes: int
    seed: int
    image_sizes: tuple[tuple[int, int], ...]

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    def tokens_per_image(self) -> list[int]:
        p = self.patch_size
        return [(h // p) * (w // p) for h, w in self.image_sizes]


def load_workload(path: Path) -> Workload:
    """Reads and checks a workload JSON (see ../shared/bench/navit_s16_train.json)."""
    spec = json.loads(Path(path).read_text())
    for key, expected in (("optimizer", "adamw"), ("dtype", "float32")):
        if spec.get(key, expected) != expected:
            raise ValueError(
                f"workload {path}: {key}={spec[key]!r} is not supported; this benchmark runs "
                f"{key}={expected!r}. Change the workload or extend the benchmark."
            )
    model = spec["model"]
    workload = Workload(
        patch_size=spec["patch_size"],
        channels=spec["channels"],
        seq_len=spec["seq_len"],
        max_examples_per_seq=spec["max_examples_per_seq"],
        width=model["width"],
        depth=model["depth"],
        num_heads=model["num_heads"],
        mlp_dim=model["mlp_dim"],
        num_classes=model["num_classes"],
        seed=spec.get("seed", 0),
        image_sizes=tuple((int(h), int(w)) for h, w in spec["images"]),
    )
    p = workload.patch_size
    for h, w in workload.image_sizes:
        if h % p or w % p:
            raise ValueError(
                f"workload {path}: image size {(h, w)} is not a multiple of patch_size={p}; "
                "list sizes already resized to whole patches."
            )
        if (h // p) * (w // p) > workload.seq_len:
            raise ValueError(
                f"workload {path}: image size {(h, w)} has {(h // p) * (w // p)} patches, more "
                f"than seq_len={workload.seq_len}; shrink the image or raise seq_len."
            )
    if "real_tokens" in spec and spec["real_tokens"] != sum(workload.tokens_per_image):
        raise ValueError(
            f"workload {path}: real_tokens={spec['real_tokens']} but the image sizes give "
            f"{sum(workload.tokens_per_image)} patches; fix one of them."
        )
    return workload


def random_images(workload: Workload) -> list[np.ndarray]:
    """Random uint8 pixels [H, W, C] at the workload's sizes (content does not change cost)."""
    rng = np.random.default_rng(workload.seed)
    return [
        rng.integers(0, 256, size=(h, w, workload.channels), dtype=np.uint8)
        for h, w in workload.image_sizes
    ]


def random_labels(workload: Workload) -> np.ndarray:
    """One class per image, as multi-hot float32 targets [num_images, num_classes]."""
    rng = np.random.default_rng(workload.seed + 1)
    classes = rng.integers(0, workload.num_classes, size=len(workload.image_sizes))
    return np.eye(workload.num_classes, dtype=np.float32)[classes]


# ----------------------------------------------------------------------------- packing


def per_image_elements(
    images: list[np.ndarray], labels: np.ndarray, patch_size: int
) -> list[dict[str, Any]]:
    """Each image as the pipeline's per-image element (docs/architecture.md section 2)."""
    elements = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        image_patches, patch_coords, image_grid = patches.patchify(image, patch_size)
        size = np.asarray(image.shape[:2], np.int32)
        elements.append(
            {
                "patches": image_patches,  # [N, P*P*C]
                "patch_coords": patch_coords,  # [N, 2]
                "image_grid": image_grid,
                "image_size": size,
                "original_size": size,
                "example_id": index,
                "task_id": 0,
                "targets": {"labels": label},
                "stream_index": index,
                "counts": {},
            }
        )
    return elements


def pack_workload(images: list[np.ndarray], labels: np.ndarray, workload: Workload) -> Batch:
    """All images in one batch of the fewest rows navit_seq's first-fit packer needs, as the
    classification objective reads it (`classification.BATCH_KEYS`)."""
    elements = per_image_elements(images, labels, workload.patch_size)
    rows = -(-sum(workload.tokens_per_image) // workload.seq_len)  # ceil: no fewer can work
    while True:
        packer = packing.PackIterDataset(
            grain.MapDataset.source(elements).to_iter_dataset(),
            elements.__getitem__,
            batch_size=rows,
            seq_len=workload.seq_len,
            max_examples_per_seq=workload.max_examples_per_seq,
            buffer_size=len(elements),
            patch_dim=workload.patch_dim,
            target_spec={"labels": ((workload.num_classes,), np.float32)},
        )
        batch = next(iter(packer))
        if batch["example_valid"].sum() == len(elements):
            return loop.model_inputs(batch, classification.BATCH_KEYS)
        rows += 1


def fixed_length_batch(packed: Batch) -> Batch:
    """Same [B, L] shapes as `packed` with one full-length image per row: the ViT baseline.

    Each row is a (L / cols) x cols grid of real patches in slot 0, so every query attends to
    its whole row, as in a plain fixed-length ViT.
    """
    rows, length = packed["segment_ids"].shape
    cols = int(np.sqrt(length))
    while length % cols:
        cols -= 1
    grid = np.stack(np.divmod(np.arange(length, dtype=np.int32), cols), -1)  # [L, 2]
    batch = jax.tree.map(np.zeros_like, packed)
    batch["patches"] = packed["patches"]  # pixel values do not change the cost
    batch["segment_ids"][:] = 1
    batch["patch_coords"][:] = grid
    batch["image_grid"][:, 0] = (length // cols, cols)
    batch["example_valid"][:, 0] = True
    batch["targets"]["labels"][:, 0] = packed["targets"]["labels"][:, 0]
    return batch


# ----------------------------------------------------------------------------- the trainer's step


def trainer_config(workload: Workload, rows: int, attention_impl: str) -> ml_collections.ConfigDict:
    """A classification recipe for the workload: navit_seq's Classifier (paper defaults:
    qk-norm, no biases, MAP head) at its sizes, sigmoid cross-entropy, plain AdamW (constant
    learning rate, no clipping) on one device, one batch of `rows` rows."""
    config = ml_collections.ConfigDict()
    config.trainer = "classification"
    config.seed = workload.seed
    config.loss = "sigmoid_xent"
    config.mesh = config_common.default_mesh_config()
    config.mesh.num_devices = 1
    config.data = ml_collections.ConfigDict({"batch_size": rows})
    config.model = navit.default_model_config()
    config.model.attention_impl = attention_impl
    config.model.width = workload.width
    config.model.depth = workload.depth
    config.model.num_heads = workload.num_heads
    config.model.mlp_dim = workload.mlp_dim
    config.model.num_classes = workload.num_classes
    config.model.patch_size = workload.patch_size
    config.model.num_channels = workload.channels
    config.optimizer = config_common.default_optimizer_config()
    config.optimizer.learning_rate = LEARNING_RATE
    config.optimizer.weight_decay = ((".*", WEIGHT_DECAY),)
    config.optimizer.grad_clip_norm = 0.0
    config.optimizer.schedule.kind = "constant"
    return config


def workload_objective(config: ml_collections.ConfigDict, batch: Batch) -> loop.Objective:
    """The classification objective (`navit_seq.train.classification`) on the workload's batch."""
    return loop.Objective(
        batch_keys=classification.BATCH_KEYS,
        model_fn=classification.model_fn(config),
        loss=classification.make_loss(config),
        eval_metrics=classification.make_eval_metrics(config),
        train_iterator=lambda: itertools.repeat(batch),
        eval_iterator=lambda: [batch],
    )


@dataclass(frozen=True)
class StepTiming:
    """Median wall-clock and process CPU seconds per step (CPU time is the steadier figure on a
    shared machine: other processes stretch wall time far more than they change CPU time)."""

    wall_s: float
    cpu_s: float


def time_interleaved(
    run_steps: list[Callable[[], Any]], *, warmup: int, steps: int
) -> list[StepTiming]:
    """Times each blocking `run_steps[i]`, calling them in turn, after `warmup` rounds.

    Interleaving exposes every step to the same load, so their ratio holds on a busy machine.
    """
    walls = [[] for _ in run_steps]
    cpus = [[] for _ in run_steps]
    for round_index in range(warmup + steps):
        for run_step, step_walls, step_cpus in zip(run_steps, walls, cpus, strict=True):
            wall, cpu = time.perf_counter(), time.process_time()
            run_step()
            if round_index >= warmup:
                step_walls.append(time.perf_counter() - wall)
                step_cpus.append(time.process_time() - cpu)
    return [
        StepTiming(statistics.median(w), statistics.median(c))
        for w, c in zip(walls, cpus, strict=True)
    ]


def compile_trainer_step(
    workload: Workload, batch: Batch, attention_impl: str
) -> tuple[Callable[[], None], jax.stages.Compiled]:
    """A blocking runner of `loop.Trainer`'s compiled step on `batch` (donated state carried
    over), and that executable."""
    rows = batch["segment_ids"].shape[0]
    config = trainer_config(workload, rows, attention_impl)
    trainer = loop.Trainer(config, workload_objective(config, batch))
    state = trainer.init_state()
    device_batch = trainer.global_batch(batch)
    compiled = trainer.compiled_train_step(state, device_batch)

    def run_step() -> None:
        nonlocal state
        state, metrics = trainer.train_step(state, device_batch)
        jax.block_until_ready((state, metrics))
        loss = float(metrics["loss"].compute())
        if not np.isfinite(loss):
            raise RuntimeError(f"the training step produced a non-finite loss: {loss}")

    return run_step, compiled


def xla_flops(compiled: jax.stages.Compiled) -> float | None:
    """FLOPs XLA's cost model assigns to the compiled step (None where it gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_peak_flops(size: int, repeats: int, compiler_options: dict[str, str]) -> float:
    """Best FLOP/s of a jitted fp32 [size, size] @ [size, size] matmul: the machine's peak."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32)
    b = jax.random.normal(key_b, (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=compiler_options)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ----------------------------------------------------------------------------- peer step


def import_peer_navit() -> ModuleType:
    """lucidrains' vit_pytorch.na_vit, loaded from its file.

    `import vit_pytorch` runs the package __init__, which imports torchvision (for DINO & co);
    the torchvision wheel pip pairs with CPU torch here is a CUDA build whose operators fail to
    register. na_vit.py itself imports only torch and einops, so it is loaded on its own.
    """
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "vit-pytorch is not installed: `.venv/bin/pip install -e '.[bench]'`, or pass "
            "--skip-peer."
        )
    path = Path(spec.submodule_search_locations[0]) / "na_vit.py"
    module_spec = importlib.util.spec_from_file_location("peer_na_vit", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def time_peer_step(
    images: list[np.ndarray],
    labels: np.ndarray,
    workload: Workload,
    *,
    warmup: int,
    steps: int,
    threads: int,
) -> StepTiming:
    """Times an AdamW step of vit-pytorch's NaViT on the same images and labels."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(workload.seed)
    na_vit = import_peer_navit()
    largest = max(max(h, w) for h, w in workload.image_sizes)
    model = na_vit.NaViT(
        image_size=largest,  # sizes its positional tables; images may be any size up to it
        patch_size=workload.patch_size,
        num_classes=workload.num_classes,
        dim=workload.width,
        depth=workload.depth,
        heads=workload.num_heads,
        dim_head=workload.width // workload.num_heads,
        mlp_dim=workload.mlp_dim,
        channels=workload.channels,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    # Pixels normalized as navit_seq does (x / 127.5 - 1), channels first as the peer expects.
    peer_images = [
        torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
        for image in images
    ]
    targets = torch.from_numpy(labels)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(peer_images, group_images=True, group_max_seq_len=workload.seq_len)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, targets, reduction="sum"
        ) / len(peer_images)
        loss.backward()
        optimizer.step()

    model.train()
    (timing,) = time_interleaved([step], warmup=warmup, steps=steps)
    return timing


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        type=Path,
        default=Path(__file__).resolve().parents[3] / "shared/bench/navit_s16_train.json",
        help="workload JSON (model sizes, seq_len, image sizes)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed navit_seq steps (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--peer-steps", type=int, default=3, help="timed peer steps (median)")
    parser.add_argument("--peer-warmup", type=int, default=1)
    parser.add_argument("--peer-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-peer", action="store_true", help="do not run vit-pytorch")
    parser.add_argument(
        "--attention-impl",
        choices=attention.SEGMENT_ATTENTION_IMPLS,
        default=None,
        help="the packed step's model.attention_impl (default: fused_cpu on CPU, else xla); "
        "the packed step with xla attention is timed as well (once, when it is the same)",
    )
    parser.add_argument("--peak-size", type=int, default=4096, help="matmul side for the peak")
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument(
        "--async-dispatch",
        action="store_true",
        help="keep JAX's asynchronous CPU dispatch instead of "
        "cpu_runtime.synchronous_cpu_dispatch()",
    )
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave glibc's malloc as it is instead of cpu_runtime.keep_freed_memory() "
        "(applies to the peer too: both run in this process)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every measurement and returns the results dict (the JSON line)."""
    if not args.async_dispatch:
        cpu_runtime.synchronous_cpu_dispatch()  # before the first JAX computation, as main.py
    workload = load_workload(args.workload)
    images, labels = random_images(workload), random_labels(workload)
    packed = pack_workload(images, labels, workload)
    fixed = fixed_length_batch(packed)
    rows, seq_len = packed["segment_ids"].shape
    real_tokens = int((packed["segment_ids"] > 0).sum())
    num_images = int(packed["example_valid"].sum())
    if num_images != len(images):
        raise RuntimeError(f"packing kept {num_images} of {len(images)} images")

    on_cpu = jax.default_backend() == "cpu"
    compiler_options = cpu_runtime.compiler_options()  # what the trainer compiles with
    # The trainer's entry point does the same (navit_seq/main.py); process-wide, so the peer's
    # torch allocations get it too.
    kept_freed_memory = on_cpu and not args.glibc_defaults and cpu_runtime.keep_freed_memory()
    impl = args.attention_impl or ("fused_cpu" if on_cpu else "xla")
    load_before = os.getloadavg()[0]
    run_packed_xla, compiled_xla = compile_trainer_step(workload, packed, "xla")
    run_fixed, _ = compile_trainer_step(workload, fixed, "xla")
    if impl == "xla":  # the packed step is the XLA-attention step: compile and time it once
        packed_xla_step, fixed_step = time_interleaved(
            [run_packed_xla, run_fixed], warmup=args.warmup, steps=args.steps
        )
        packed_step = packed_xla_step
    else:
        run_packed, _ = compile_trainer_step(workload, packed, impl)
        packed_step, packed_xla_step, fixed_step = time_interleaved(
            [run_packed, run_packed_xla, run_fixed], warmup=args.warmup, steps=args.steps
        )
    peer_step = None
    if not args.skip_peer:
        peer_step = time_peer_step(
            images,
            labels,
            workload,
            warmup=args.peer_warmup,
            steps=args.peer_steps,
            threads=args.peer_threads,
        )
    peak = matmul_peak_flops(args.peak_size, args.peak_repeats, compiler_options)

    shape = flop_count.ModelShape(
        workload.width, workload.depth, workload.mlp_dim, workload.num_classes, workload.patch_dim
    )
    # The fused kernel scores each image's own tokens only; XLA scores every key of the row.
    scored_pairs = sum(n * n for n in workload.tokens_per_image) if impl == "fused_cpu" else None
    step_flops = flop_count.packed_step_flops(
        shape, rows, seq_len, workload.max_examples_per_seq, scored_pairs
    )
    xla_step_flops = flop_count.packed_step_flops(
        shape, rows, seq_len, workload.max_examples_per_seq
    )
    useful_flops = flop_count.useful_step_flops(shape, workload.tokens_per_image)
    packed_s = packed_step.wall_s
    peer_s = peer_step.wall_s if peer_step else None
    return {
        "workload": str(args.workload),
        "rows": rows,
        "seq_len": seq_len,
        "images": num_images,
        "real_tokens": real_tokens,
        "padding_fraction": 1 - real_tokens / (rows * seq_len),
        "attention_impl": impl,
        "packed_step_s": packed_s,
        "packed_xla_step_s": packed_xla_step.wall_s,
        "fixed_len_step_s": fixed_step.wall_s,
        "packing_cost": packed_s / fixed_step.wall_s,
        "images_per_s": num_images / packed_s,
        "tokens_per_s": real_tokens / packed_s,
        "peer_step_s": peer_s,
        "peer_tokens_per_s": real_tokens / peer_s if peer_s else None,
        "peer_images_per_s": num_images / peer_s if peer_s else None,
        "speedup_vs_peer": peer_s / packed_s if peer_s else None,
        "packed_step_cpu_s": packed_step.cpu_s,
        "packed_xla_step_cpu_s": packed_xla_step.cpu_s,
        "fixed_len_step_cpu_s": fixed_step.cpu_s,
        "peer_step_cpu_s": peer_step.cpu_s if peer_step else None,
        "step_flops": step_flops,
        "useful_step_flops": useful_flops,
        "xla_step_flops": xla_flops(compiled_xla),  # a custom call's FLOPs are not counted
        "achieved_flops": step_flops / packed_s,
        "matmul_peak_flops": peak,
        "mfu": step_flops / packed_s / peak,
        "xla_attention_mfu": xla_step_flops / packed_xla_step.wall_s / peak,
        "useful_mfu": useful_flops / packed_s / peak,
        "compiler_options": compiler_options,
        "keep_freed_memory": kept_freed_memory,
        "cpu_async_dispatch": args.async_dispatch,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "jax": jax.__version__,
        "torch_threads": args.peer_threads if peer_step else None,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
    }


def print_results(results: dict[str, Any]) -> None:
    """One readable line per figure, then the whole dict as one JSON line (last)."""
    for key, value in results.items():
        print(f"{key:>20}: {value:.4g}" if isinstance(value, float) else f"{key:>20}: {value}")
    print(json.dumps(results))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    results = run(parse_args(argv))
    print_results(results)
    return results


if __name__ == "__main__":
    main()
