"""A tiny stand-in for the classifier (same input/output contract) and synthetic packed batches.

Lets the trainer's tests run without the real encoder: linear patch embedding, one MLP, masked
mean pooling per segment, a linear head; parameters carry the architecture's logical axis names.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PATCH_DIM = 12  # P*P*C of the synthetic patches
NUM_CLASSES = 8


def _init(names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class ToyClassifier(nnx.Module):
    def __init__(self, width=16, num_classes=NUM_CLASSES, dropout=0.1, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(PATCH_DIM, width, kernel_init=_init(("patch", "embed")), rngs=rngs)
        self.mlp = nnx.Linear(width, 2 * width, kernel_init=_init(("embed", "mlp")), rngs=rngs)
        self.out = nnx.Linear(2 * width, width, kernel_init=_init(("mlp", "embed")), rngs=rngs)
        self.head = nnx.Linear(
            width, num_classes, kernel_init=_init(("embed", "classes")), rngs=rngs
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, batch, deterministic: bool = True):
        x = batch["patches"].astype(jnp.float32) / 127.5 - 1.0  # [B, L, PD]
        x = self.embed(x)  # [B, L, D]
        x = x + self.out(nnx.gelu(self.mlp(x)))
        x = self.dropout(x, deterministic=deterministic)
        num_slots = batch["example_valid"].shape[1]
        slot_of_token = jax.nn.one_hot(batch["segment_ids"] - 1, num_slots)  # [B, L, E]
        counts = slot_of_token.sum(axis=1)[..., None]  # [B, E, 1]
        pooled = jnp.einsum("ble,bld->bed", slot_of_token, x) / jnp.maximum(counts, 1.0)
        return {
            "tokens": x,
            "pooled": pooled,
            "pooled_valid": batch["example_valid"],
            "logits": self.head(pooled),
        }


def synthetic_batch(rng: np.random.Generator, batch_size=8, seq_len=16, max_examples=3):
    """A packed batch in the architecture.md §3 layout with random images and labels."""
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    example_valid = np.zeros((batch_size, max_examples), bool)
    for row in range(batch_size):
        pos = 0
        for slot in range(rng.integers(1, max_examples + 1)):
            length = int(rng.integers(2, 6))
            if pos + length > seq_len:
                break
            segment_ids[row, pos : pos + length] = slot + 1
            example_valid[row, slot] = True
            pos += length
    labels = (rng.random((batch_size, max_examples, NUM_CLASSES)) < 0.3) & example_valid[..., None]
    return {
        "patches": rng.integers(0, 256, (batch_size, seq_len, PATCH_DIM), dtype=np.uint8),
        "segment_ids": segment_ids,
        "patch_coords": np.zeros((batch_size, seq_len, 2), np.int32),
        "image_grid": np.ones((batch_size, max_examples, 2), np.int32),
        "example_valid": example_valid,
        "example_id": np.where(example_valid, 0, -1).astype(np.int64),
        "task_id": np.zeros((batch_size, max_examples), np.int32),
        "targets": {"labels": labels.astype(np.float32)},
    }


def toy_train_dataset(seed: int = 0, sleep_s: float = 0.0, **batch_kwargs):
    """A checkpointable grain dataset of synthetic packed batches (batch i from seed + i).

    `sleep_s` slows each batch down so a subprocess test can signal a run mid-way.
    """
    import time

    import grain

    def make(index):
        time.sleep(sleep_s)
        return synthetic_batch(np.random.default_rng(seed + index), **batch_kwargs)

    # One reader thread and a one-batch prefetch, so `sleep_s` really paces the stream.
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
    return grain.MapDataset.range(10_000).map(make).to_iter_dataset(read)


def toy_objective(config):
    """The real classification loss and metrics on the toy model and synthetic data."""
    from navit_seq.train import classification
    from navit_seq.train.loop import Objective

    batch_kwargs = dict(
        batch_size=config.data.batch_size,
        seq_len=config.data.seq_len,
        max_examples=config.data.max_examples_per_seq,
    )
    return Objective(
        batch_keys=classification.BATCH_KEYS,
        model_fn=lambda: ToyClassifier(
            dropout=config.model.get("dropout", 0.1), rngs=nnx.Rngs(config.seed)
        ),
        loss=classification.make_loss(config),
        eval_metrics=classification.make_eval_metrics(config),
        train_iterator=lambda: iter(
            toy_train_dataset(config.seed, config.data.get("sleep_s", 0.0), **batch_kwargs)
        ),
        eval_iterator=lambda: [
            synthetic_batch(np.random.default_rng(10**6 + i), **batch_kwargs) for i in range(2)
        ],
    )


def toy_config(mesh_shape=(-1, 1, 1), num_devices=-1):
    """A complete training config for the toy objective."""
    import ml_collections

    from navit_seq.config_common import default_optimizer_config

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.trainer = "classification"
    config.num_train_steps = 4
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 2
    config.mesh = dict(
        axis_names=("data", "fsdp", "tensor"),
        shape=mesh_shape,
        num_devices=num_devices,
        rules=(
            ("act_batch", ("data", "fsdp")),
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("classes", "tensor"),
        ),
    )
    config.data = dict(batch_size=8, seq_len=16, max_examples_per_seq=3)
    config.model = dict(dropout=0.1)
    config.optimizer = default_optimizer_config()
    config.optimizer.learning_rate = 1e-2
    return config


objective = toy_objective  # what navit_seq.main looks up in a trainer module
