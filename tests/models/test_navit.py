"""NaViT encoder: packed-vs-alone invariance, isolation, NaN-freedom, eval determinism,
parameter counts of the presets, logical axis names, sharded forward; the model-level tests
run with both segment-attention implementations ("xla", "fused_cpu")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from navit_seq.models.classifier import Classifier
from navit_seq.models.navit import PRESETS, NaViT, default_model_config, preset

PATCH, CHANNELS = 2, 3
PATCH_DIM = PATCH * PATCH * CHANNELS
SEQ_LEN, MAX_EXAMPLES = 32, 3
# Rows of (rows, cols) image grids; row 2 is all padding.
PACKING = [[(2, 3), (3, 3), (4, 2)], [(2, 2)], []]


def tiny_config(**overrides):
    config = default_model_config()
    config.update(dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=PATCH))
    config.posemb.max_len = 8
    config.update(overrides)
    return config


def random_images(seed: int = 0, packing=PACKING) -> list[list[np.ndarray]]:
    """Patches [rows*cols, P*P*C] uint8 for every image of `packing` (rows of image grids)."""
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, 256, (r * c, PATCH_DIM), dtype=np.uint8) for r, c in row]
        for row in packing
    ]


def pack(images, grids, seq_len: int, max_examples: int) -> dict[str, np.ndarray]:
    """Builds the packed batch of docs/architecture.md section 3 by hand."""
    batch = len(images)
    out = {
        "patches": np.zeros((batch, seq_len, PATCH_DIM), np.uint8),
        "segment_ids": np.zeros((batch, seq_len), np.int32),
        "patch_coords": np.zeros((batch, seq_len, 2), np.int32),
        "image_grid": np.zeros((batch, max_examples, 2), np.int32),
        "example_valid": np.zeros((batch, max_examples), bool),
    }
    for b, (row_images, row_grids) in enumerate(zip(images, grids, strict=True)):
        start = 0
        for e, (patches, (rows, cols)) in enumerate(zip(row_images, row_grids, strict=True)):
            n = rows * cols
            coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
            out["patches"][b, start : start + n] = patches
            out["segment_ids"][b, start : start + n] = e + 1
            out["patch_coords"][b, start : start + n] = coords.reshape(n, 2)
            out["image_grid"][b, e] = (rows, cols)
            out["example_valid"][b, e] = True
            start += n
    return out


@nnx.jit(static_argnames="deterministic")
def run(model: NaViT, batch, deterministic: bool):
    """Any model's forward, compiled (eager op-by-op dispatch is slower on a busy CPU)."""
    return model(batch, deterministic=deterministic)


def packed_batch(images) -> dict[str, np.ndarray]:
    return pack(images, PACKING, SEQ_LEN, MAX_EXAMPLES)


def image_slices(row: int):
    """Token slice of each image of a PACKING row."""
    starts = np.cumsum([0] + [r * c for r, c in PACKING[row]])
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


@pytest.fixture(scope="module", params=["xla", "fused_cpu"])
def model(request) -> NaViT:
    """The tiny encoder with each segment-attention implementation: every invariance, padding,
    gradient and sharding test below runs on both."""
    return NaViT(tiny_config(attention_impl=request.param), rngs=nnx.Rngs(0))


def impl_of(model: NaViT) -> str:
    return model.blocks[0].attention.impl


def jitted_forward(model: nnx.Module):
    """batch -> numpy outputs of `model`'s deterministic forward (one compile per shape)."""
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda s, batch: nnx.merge(graphdef, s)(batch, deterministic=True))
    return lambda batch: jax.tree.map(np.asarray, apply(state, batch))


@pytest.fixture(scope="module")
def forward(model):
    """Jitted deterministic forward shared by the tests."""
    return jitted_forward(model)


@pytest.fixture(scope="module")
def packed_outputs(forward):
    images = random_images()
    return images, forward(packed_batch(images))


def test_packed_forward_matches_each_image_run_alone(forward, packed_outputs):
    images, packed = packed_outputs
    for row, row_images in enumerate(images):
        for e, (patches, grid, tokens) in enumerate(
            zip(row_images, PACKING[row], image_slices(row), strict=True)
        ):
            alone = forward(pack([[patches]], [[grid]], len(patches), 1))
            np.testing.assert_allclose(
                packed["tokens"][row, tokens], alone["tokens"][0], rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(
                packed["pooled"][row, e], alone["pooled"][0, 0], rtol=1e-4, atol=1e-5
            )


def test_changing_one_image_leaves_every_other_output_bit_identical(forward, packed_outputs):
    images, before = packed_outputs
    changed = [list(row) for row in images]
    changed[0][1] = 255 - changed[0][1]  # the middle image of row 0
    after = forward(packed_batch(changed))
    middle = image_slices(0)[1]
    assert not np.array_equal(before["tokens"][0, middle], after["tokens"][0, middle])
    others = np.ones((len(PACKING), SEQ_LEN), bool)
    others[0, middle] = False
    np.testing.assert_array_equal(before["tokens"][others], after["tokens"][others])
    slots = np.ones((len(PACKING), MAX_EXAMPLES), bool)
    slots[0, 1] = False
    np.testing.assert_array_equal(before["pooled"][slots], after["pooled"][slots])


def test_padding_tokens_and_empty_slots_are_zero_finite_and_invalid(packed_outputs):
    _, outputs = packed_outputs
    batch = packed_batch(random_images())
    padding = batch["segment_ids"] == 0
    assert padding[2].all() and padding.sum() > SEQ_LEN
    assert all(np.isfinite(v).all() for v in outputs.values())
    assert not outputs["tokens"][padding].any()
    np.testing.assert_array_equal(outputs["pooled_valid"], batch["example_valid"])
    assert not outputs["pooled"][~batch["example_valid"]].any()


def test_gradients_are_finite_with_padding_rows_and_empty_slots(model):
    batch = packed_batch(random_images())
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        outputs = nnx.merge(graphdef, params, rest)(batch, deterministic=True)
        return (outputs["pooled"] ** 2).sum() + (outputs["tokens"] ** 2).sum()

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in leaves)


def test_evaluation_is_deterministic_and_ignores_dropout_rate(model, packed_outputs):
    images, reference = packed_outputs
    batch = packed_batch(images)
    config = tiny_config(dropout=0.5, attention_impl=impl_of(model))
    with_dropout = NaViT(config, rngs=nnx.Rngs(0))  # same params (seed 0)
    first = run(with_dropout, batch, deterministic=True)
    second = run(with_dropout, batch, deterministic=True)
    np.testing.assert_array_equal(first["tokens"], second["tokens"])
    np.testing.assert_allclose(first["pooled"], reference["pooled"], rtol=1e-5, atol=1e-6)
    # No token is dropped at evaluation: every real token has an output.
    assert (np.abs(np.asarray(first["tokens"])).sum(-1) > 0).sum() == (
        batch["segment_ids"] > 0
    ).sum()
    # Dropout is wired: training mode changes the outputs.
    training = run(with_dropout, batch, deterministic=False)
    assert not np.allclose(training["tokens"], first["tokens"])


# timm's parameter counts (cls token, 197 position rows, biases, 1000-class head):
# vit_{tiny,small,base,large}_patch16_224.
TIMM_COUNTS = {"Ti": 5_717_416, "S": 22_050_664, "B": 86_567_656, "L": 304_326_632}


@pytest.mark.parametrize("variant", list(TIMM_COUNTS))
def test_preset_parameter_count_matches_standard_vit(variant):
    """Counted: standard ViT/16 body with biases, learned 1D table of 14x14 positions, mean
    pooling, 1000-class head; timm also has a cls token and its position row (2 * width)."""
    config = default_model_config()
    config.update(dict(variant=variant, use_bias=True, qk_norm=False, pooling="mean"))
    config.posemb.update(dict(kind="learned_1d", max_len=14))
    abstract = nnx.eval_shape(lambda: Classifier(config, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == TIMM_COUNTS[variant] - 2 * preset(variant)["width"]


@pytest.mark.parametrize("variant", ("S", "B"))
def test_paper_default_encoder_parameter_count_matches_formula(variant):
    """Counted: NaViT defaults (no biases, qk-norm, factorized learned posemb, MAP head), no
    classifier head."""
    config = default_model_config()
    config.update(dict(variant=variant, pooling="map"))
    d, m, depth, heads = (preset(variant)[k] for k in ("width", "mlp_dim", "depth", "num_heads"))
    per_block = 2 * d + 4 * d * d + 2 * (d // heads) + 2 * d * m  # 2 LN, qkv+out, qk-norm, MLP
    map_head = d + 4 * d * d + d + 2 * d * m  # probe, q+kv+out, LN, MLP
    posemb = 2 * config.posemb.max_len * d
    expected = 16 * 16 * 3 * d + posemb + depth * per_block + d + map_head
    abstract = nnx.eval_shape(lambda: NaViT(config, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == expected


def test_presets_have_head_dims_that_divide_width():
    assert set(PRESETS) == {"Ti", "S", "B", "L", "H", "g"}
    assert all(p["width"] % p["num_heads"] == 0 for p in PRESETS.values())


ALLOWED_NAMES = {"embed", "mlp", "heads", "head_dim", "patch", "classes", "posemb_len", None}


def test_every_parameter_has_one_logical_axis_name_per_dimension(model):
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = variable.get_metadata()["out_sharding"]
        assert len(names) == variable[...].ndim, path
        assert set(names) <= ALLOWED_NAMES, path


def test_forward_under_a_sharded_mesh_matches_unsharded(model, packed_outputs):
    images, reference = packed_outputs
    batch = packed_batch(images)
    batch = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}  # B = 4 shards over data
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    # flax needs a rule for every parameter axis name (None = replicated).
    rules = (
        ("act_batch", "data"), ("mlp", "tensor"), ("heads", "tensor"), ("act_mlp", "tensor"),
        ("act_heads", "tensor"),
        *((name, None) for name in ("embed", "head_dim", "patch", "classes", "posemb_len")),
    )  # fmt: skip
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        shardings = nnx.get_named_sharding(state, mesh)
        state = jax.device_put(state, shardings)
        apply = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b, deterministic=True))
        sharded = apply(state, batch)
        assert state["blocks"][0]["mlp"]["fc1"]["kernel"][...].sharding.spec[1] == "tensor"
    np.testing.assert_allclose(sharded["pooled"][:3], reference["pooled"], rtol=1e-5, atol=1e-6)


def test_wrong_patch_size_raises_naming_the_fix(model):
    batch = packed_batch(random_images())
    batch["patches"] = np.zeros((3, SEQ_LEN, 5 * 5 * 3), np.uint8)
    with pytest.raises(ValueError, match="model.patch_size"):
        model(batch, deterministic=True)


def test_bfloat16_activations_run_and_stay_finite(model, packed_outputs):
    images, reference = packed_outputs
    model = NaViT(tiny_config(dtype="bfloat16", attention_impl=impl_of(model)), rngs=nnx.Rngs(0))
    outputs = run(model, packed_batch(images), deterministic=True)
    assert outputs["tokens"].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(outputs["pooled"], np.float32), reference["pooled"], atol=0.1
    )
