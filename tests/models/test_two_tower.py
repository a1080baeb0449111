"""Two-tower model: shapes, unit norms, validity masks, SigLIP/CLIP initial temperature and
bias, gradients reaching both towers, and the contrastive losses running on its outputs."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_navit import jitted_forward, packed_batch, random_images, tiny_config
from test_text_tower import MAX_EXAMPLES, pack_captions, random_captions, tiny_text_config

from navit_seq.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from navit_seq.models.two_tower import TwoTower, default_two_tower_config

EMBED_DIM = 8


def tiny_two_tower_config(loss: str = "sigmoid"):
    config = default_two_tower_config(loss)
    config.image = tiny_config()
    config.text = tiny_text_config()
    config.embed_dim = EMBED_DIM
    return config


def image_caption_batch(drop_last_caption_of_row_0: bool = False) -> dict[str, np.ndarray]:
    """Rows of images (test_navit.PACKING) with their captions (test_text_tower.PACKING)."""
    captions = random_captions()
    if drop_last_caption_of_row_0:
        captions[0] = captions[0][:2]
    images = packed_batch(random_images())
    text = pack_captions(captions, 20, MAX_EXAMPLES)
    del text["example_valid"]  # the images' slots are the examples
    return {**images, **text}


@pytest.fixture(scope="module")
def model() -> TwoTower:
    return TwoTower(tiny_two_tower_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    return jitted_forward(model)


@pytest.fixture(scope="module")
def outputs(forward):
    return forward(image_caption_batch())


def test_outputs_are_per_slot_embeddings_and_scalar_temperature_and_bias(outputs):
    batch_size = len(random_images())
    for name in ("image_emb", "text_emb"):
        assert outputs[name].shape == (batch_size, MAX_EXAMPLES, EMBED_DIM)
        assert outputs[name].dtype == np.float32
    for name in ("image_valid", "text_valid", "pair_valid"):
        assert outputs[name].shape == (batch_size, MAX_EXAMPLES) and outputs[name].dtype == bool
    assert outputs["temperature"].shape == () and outputs["bias"].shape == ()


def test_embeddings_have_unit_norm_where_valid_and_are_zero_elsewhere(outputs):
    for name, valid in (("image_emb", "image_valid"), ("text_emb", "text_valid")):
        norms = np.linalg.norm(outputs[name], axis=-1)
        np.testing.assert_allclose(norms[outputs[valid]], 1.0, rtol=1e-5)
        assert not outputs[name][~outputs[valid]].any()
    assert outputs["pair_valid"].sum() == 4  # three images in row 0, one in row 1


def test_pair_is_invalid_when_its_image_has_no_caption(forward):
    outputs = forward(image_caption_batch(drop_last_caption_of_row_0=True))
    assert outputs["image_valid"][0, 2] and not outputs["text_valid"][0, 2]
    assert not outputs["pair_valid"][0, 2]
    np.testing.assert_array_equal(
        outputs["pair_valid"], outputs["image_valid"] & outputs["text_valid"]
    )
    assert outputs["pair_valid"].sum() == 3


@pytest.mark.parametrize(("loss", "temperature", "bias"), [("sigmoid", 0.1, -10.0),
                                                           ("softmax", 0.07, 0.0)])  # fmt: skip
def test_initial_temperature_and_bias_follow_siglip_and_clip(loss, temperature, bias):
    config = tiny_two_tower_config(loss)
    model = TwoTower(config, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.exp(-model.log_logit_scale[...]), temperature, rtol=1e-6)
    np.testing.assert_allclose(model.bias[...], bias)


def test_siglip_loss_gradient_reaches_both_towers_temperature_and_bias(model):
    batch = image_caption_batch(drop_last_caption_of_row_0=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(batch, deterministic=True)
        return sigmoid_contrastive_loss(
            out["image_emb"].reshape(-1, EMBED_DIM), out["text_emb"].reshape(-1, EMBED_DIM),
            out["pair_valid"].reshape(-1), out["temperature"], out["bias"],
        )  # fmt: skip

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    magnitude = lambda tree: sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(tree))
    for part in ("image_tower", "text_tower", "image_projection", "text_projection"):
        assert magnitude(grads[part]) > 0, part
    assert magnitude(grads["log_logit_scale"]) > 0 and magnitude(grads["bias"]) > 0


def test_losses_on_its_outputs_equal_the_losses_over_valid_pairs_only(forward):
    outputs = forward(image_caption_batch(drop_last_caption_of_row_0=True))
    valid = outputs["pair_valid"].reshape(-1)
    image = outputs["image_emb"].reshape(-1, EMBED_DIM)
    text = outputs["text_emb"].reshape(-1, EMBED_DIM)
    temperature, bias = outputs["temperature"], outputs["bias"]
    kept = np.ones(valid.sum(), bool)
    sigmoid = sigmoid_contrastive_loss(image, text, valid, temperature, bias)
    only_valid = sigmoid_contrastive_loss(image[valid], text[valid], kept, temperature, bias)
    np.testing.assert_allclose(sigmoid, only_valid, rtol=1e-6)
    softmax = softmax_contrastive_loss(image, text, valid, temperature)
    np.testing.assert_allclose(
        softmax, softmax_contrastive_loss(image[valid], text[valid], kept, temperature), rtol=1e-6
    )
    assert np.isfinite(sigmoid) and sigmoid > 0 and np.isfinite(softmax) and softmax > 0


def test_pooling_none_for_the_image_tower_raises_naming_the_fix():
    config = tiny_two_tower_config()
    config.image.pooling = "none"
    with pytest.raises(ValueError, match="model.image.pooling='none'"):
        TwoTower(config, rngs=nnx.Rngs(0))


ALLOWED_NAMES = {"embed", "mlp", "heads", "head_dim", "patch", "vocab", "posemb_len", None}


def test_every_parameter_has_one_logical_axis_name_per_dimension(model):
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = variable.get_metadata()["out_sharding"]
        assert len(names) == variable[...].ndim, path
        assert set(names) <= ALLOWED_NAMES, path
