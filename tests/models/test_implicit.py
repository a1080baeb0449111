"""YOLOR implicit knowledge: identity values, the three forms vs numpy, the start distribution,
the config section (absent = the model it always was), per-task rows, parameter overhead."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_pix2seq import PACKING, ROW_SLOT, decoder_input, pack, random_images, tiny_config

from navit_seq.models import implicit
from navit_seq.models.pix2seq import Pix2Seq

WIDTH, COUNT = 5, 3
IDENTITY = {"add": 0.0, "multiply": 1.0, "concat": 0.0}
# Task id of each image slot of the packed rows of test_pix2seq.PACKING ([B, E_max]).
SLOT_TASKS = np.array([[1, 2, 1], [3, 0, 0]], np.int32)


def module(operator: str, form: str = "vector", count: int = 1, width: int = WIDTH, seed=0):
    return implicit.IMPLICITS[operator](
        width, count=count, form=form, prior_dim=4, factors=2, rngs=nnx.Rngs(seed)
    )


def set_values(target: nnx.Module, values: dict[str, np.ndarray]) -> None:
    for name, value in values.items():
        getattr(target, name)[...] = jnp.asarray(value, jnp.float32)


def random_values(form: str, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {
        "vector": {"vector": (count, WIDTH)},
        "network": {"prior": (count, 4), "weights": (4, WIDTH)},
        "factorised": {"basis": (2, WIDTH), "coefficients": (count, 2)},
    }[form]
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def numpy_tensor(form: str, operator: str, values: dict[str, np.ndarray]) -> np.ndarray:
    """[count, width] float64, written out from the paper's forms z, W z and Zᵀ c."""
    v = {name: value.astype(np.float64) for name, value in values.items()}
    if form == "vector":
        return v["vector"]
    if form == "network":  # one W z per row z (+ the operator's identity, its start)
        return IDENTITY[operator] + np.stack([v["weights"].T @ z for z in v["prior"]])
    return np.stack([v["basis"].T @ c for c in v["coefficients"]])  # Zᵀ c per row c


def test_implicit_a_of_zeros_and_implicit_m_of_ones_are_the_identity():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, WIDTH)), jnp.float32)
    add, multiply = module("add"), module("multiply")
    assert not np.array_equal(add(x), x) and not np.array_equal(multiply(x), x)  # as initialised
    set_values(add, {"vector": np.zeros((1, WIDTH))})
    set_values(multiply, {"vector": np.ones((1, WIDTH))})
    assert jnp.array_equal(add(x), x)
    assert jnp.array_equal(multiply(x), x)


@pytest.mark.parametrize("operator", ["add", "multiply", "concat"])
@pytest.mark.parametrize("form", implicit.FORMS)
def test_each_form_and_operator_match_numpy_shared_and_per_index(form, operator):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 2, WIDTH)).astype(np.float32)  # [N, S, D]
    index = np.array([2, 0, 2, 1], np.int32)  # [N]: the tensor each input reads
    combine = {
        "add": lambda x, t: x + t,
        "multiply": lambda x, t: x * t,
        "concat": lambda x, t: np.concatenate([x, np.broadcast_to(t, x.shape)], axis=-1),
    }[operator]
    for count, chosen in ((COUNT, index), (1, None)):
        layer = module(operator, form, count)
        values = random_values(form, count, rng)
        set_values(layer, values)
        expected_tensor = numpy_tensor(form, operator, values)  # [count, width]
        assert layer.tensor().shape == (count, WIDTH)
        np.testing.assert_allclose(layer.tensor(), expected_tensor, rtol=1e-5, atol=1e-6)
        per_input = expected_tensor[index if chosen is not None else np.zeros(4, int)]
        expected = combine(x.astype(np.float64), per_input[:, None, :])  # [N, S, D (+ width)]
        got = layer(jnp.asarray(x), None if chosen is None else jnp.asarray(chosen))
        assert got.shape == expected.shape == (4, 2, WIDTH * (2 if operator == "concat" else 1))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("operator", ["add", "multiply"])
@pytest.mark.parametrize("form", implicit.FORMS)
def test_every_form_starts_around_the_operator_identity_with_std_0_02(form, operator):
    # 64 x 1024 values; the network form's rows vary with their prior, so rows are pooled.
    tensor = np.asarray(module(operator, form, count=64, width=1024, seed=3).tensor())
    assert abs(tensor.mean() - IDENTITY[operator]) < 0.002
    assert abs(tensor.std() - implicit.INIT_STD) < 0.1 * implicit.INIT_STD


def test_a_shared_implicit_refuses_an_index_and_a_table_needs_one():
    x = jnp.ones((4, 1, WIDTH))
    with pytest.raises(ValueError, match="holds 3 tensors"):
        module("add", count=COUNT)(x)


# Pix2Seq placement.
def config_with(**options) -> ml_collections.ConfigDict:
    config = tiny_config()
    config.implicit = implicit.default_implicit_config()
    config.implicit.update(options)
    return config


def batch_with_tasks() -> dict[str, np.ndarray]:
    batch = pack(random_images(), PACKING, ROW_SLOT, decoder_input())
    return {**batch, "task_id": SLOT_TASKS}


@nnx.jit
def forward(model: Pix2Seq, batch):
    return model(batch, deterministic=True)["logits"]


def params_of(model: nnx.Module) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def without_implicit(params: dict) -> dict:
    return {
        "/".join(map(str, (getattr(k, "key", k) for k in path))): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if implicit.PREFIX not in jax.tree_util.keystr(path)
    }


def test_a_config_without_the_section_builds_the_model_it_always_did():
    old = ml_collections.ConfigDict(tiny_config().to_dict())  # a config.json of before
    assert "implicit" not in old
    off = config_with()  # the section, all off
    base, with_off = Pix2Seq(old, rngs=nnx.Rngs(0)), Pix2Seq(off, rngs=nnx.Rngs(0))
    assert jax.tree.structure(params_of(base)) == jax.tree.structure(params_of(with_off))
    got, expected = jax.tree.leaves(params_of(with_off)), jax.tree.leaves(params_of(base))
    for got_leaf, expected_leaf in zip(got, expected, strict=True):
        np.testing.assert_array_equal(got_leaf, expected_leaf)
    assert implicit.parameter_overhead(nnx.state(base, nnx.Param))["implicit"] == 0


def test_implicit_knowledge_leaves_the_explicit_initialisation_unchanged():
    base = without_implicit(params_of(Pix2Seq(tiny_config(), rngs=nnx.Rngs(0))))
    config = config_with(alignment="add", refinement="multiply", per_task=True)
    with_implicit = without_implicit(params_of(Pix2Seq(config, rngs=nnx.Rngs(0))))
    assert with_implicit.keys() == base.keys()
    for name, value in base.items():
        np.testing.assert_array_equal(with_implicit[name], value, err_msg=name)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"alignment": "subtract"}, r"model.implicit.alignment='subtract' is not one of"),
        ({"refinement": "concat"}, r"model.implicit.refinement='concat' is not one of"),
        ({"form": "tensor"}, r"model.implicit.form='tensor' is not one of"),
        ({"per_task": True}, r"per_task=True with refinement='none'.*set model.implicit.refin"),
        ({"factors": 0}, r"model.implicit.factors=0: must be >= 1"),
    ],
)
def test_bad_implicit_config_raises_naming_the_key_and_fix(options, message):
    with pytest.raises(ValueError, match=message):
        Pix2Seq(config_with(**options), rngs=nnx.Rngs(0))


def test_unknown_implicit_key_raises_listing_the_known_ones():
    config = tiny_config()
    config.implicit = {"refinment": "multiply"}
    with pytest.raises(ValueError, match=r"unknown keys \['refinment'\].*'refinement'"):
        Pix2Seq(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("form", implicit.FORMS)
def test_a_per_task_refinement_changes_only_the_rows_of_its_task(form):
    model = Pix2Seq(config_with(refinement="multiply", per_task=True, form=form), rngs=nnx.Rngs(0))
    batch = batch_with_tasks()
    before = np.asarray(forward(model, batch))
    refinement = model.decoder.implicit_refinement
    name = {"vector": "vector", "network": "prior", "factorised": "coefficients"}[form]
    table = np.array(getattr(refinement, name)[...])
    table[1] += np.random.default_rng(0).normal(size=table.shape[1])  # task 1's row only
    getattr(refinement, name)[...] = jnp.asarray(table)
    after = np.asarray(forward(model, batch))
    row_task = np.take_along_axis(SLOT_TASKS, np.maximum(ROW_SLOT, 0), axis=1)
    of_task = (row_task == 1) & (ROW_SLOT >= 0)  # [B, R]: rows 0, 2 and 3 of packed row 0
    assert of_task.sum() == 3
    assert not np.isclose(before[of_task], after[of_task]).all(axis=(-2, -1)).any()
    assert jnp.array_equal(before[~of_task], after[~of_task])


def test_a_per_task_model_needs_task_ids_in_range():
    model = Pix2Seq(config_with(refinement="add", per_task=True, num_tasks=4), rngs=nnx.Rngs(0))
    batch = batch_with_tasks()
    with pytest.raises(ValueError, match="task id 4 >= model.implicit.num_tasks=4"):
        model({**batch, "task_id": np.where(SLOT_TASKS == 3, 4, SLOT_TASKS)}, deterministic=True)
    del batch["task_id"]
    with pytest.raises(ValueError, match="batch has no 'task_id'"):
        model(batch, deterministic=True)


def test_parameter_overhead_counts_the_implicit_tensors_against_every_parameter():
    config = config_with(alignment="add", refinement="multiply", per_task=True, num_tasks=6)
    model = Pix2Seq(config, rngs=nnx.Rngs(0))
    width = config.decoder.width  # the projected memory and the decoder output
    total = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    overhead = implicit.parameter_overhead(nnx.state(model, nnx.Param))
    assert overhead["implicit"] == width + 6 * width
    assert overhead["total"] == total
    assert overhead["share"] == pytest.approx((7 * width) / total)


@pytest.mark.parametrize("form", implicit.FORMS)
def test_at_the_paper_size_implicit_knowledge_is_under_a_ten_thousandth(form):
    """ViT-B encoder + Pix2Seq's 6 x 512 decoder, 35k tokens (Pix2Seq v2), shapes only."""
    config = tiny_config()
    config.update(dict(variant="B", width=None, depth=None, num_heads=None, mlp_dim=None))
    config.decoder.update(dict(variant="S", width=None, depth=None, num_heads=None,
                               mlp_dim=None, vocab_size=35_000, max_len=512))  # fmt: skip
    config.implicit = implicit.default_implicit_config()
    config.implicit.update(dict(alignment="add", refinement="multiply", per_task=True, form=form))
    abstract = nnx.eval_shape(lambda: Pix2Seq(config, rngs=nnx.Rngs(0)))
    overhead = implicit.parameter_overhead(nnx.state(abstract, nnx.Param))
    assert 100_000_000 < overhead["total"] < 200_000_000
    assert 0 < overhead["share"] < 1e-4


def test_a_per_task_model_decodes_the_argmax_of_its_teacher_forced_logits():
    """decode.generate passes each row's task to the cached decoder steps as the forward does."""
    from navit_seq.decode import DecodeConfig, generate

    model = Pix2Seq(config_with(refinement="multiply", per_task=True), rngs=nnx.Rngs(0))
    table = model.decoder.implicit_refinement.vector
    table[...] = 1 + jax.random.normal(jax.random.key(1), table.shape)  # tasks far apart
    batch = batch_with_tasks()
    prompt = np.asarray(batch["decoder_input"])[:, :, :1]  # [B, R, 1]
    out = generate(model, batch, prompt, jax.random.key(0), DecodeConfig(max_len=6))
    tokens = np.asarray(out["tokens"])  # [B, R, 6]
    teacher = {**batch, "decoder_input": np.concatenate([prompt, tokens[:, :, :-1]], axis=2)}
    predicted = np.asarray(forward(model, teacher)).argmax(-1)  # [B, R, 6]
    real = ROW_SLOT >= 0
    np.testing.assert_array_equal(predicted[real], tokens[real])
