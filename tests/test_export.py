"""Export's folding of implicit knowledge: the folded model has no implicit parameters and gives
the same logits and decoded tokens; folds that have no bias to go into are refused.
(The export command end to end: tests/test_commands.py.)"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent / "models"))
from test_implicit import batch_with_tasks, config_with, forward  # noqa: E402

from navit_seq import config_utils, decode, export  # noqa: E402
from navit_seq.models import implicit  # noqa: E402
from navit_seq.models.pix2seq import Pix2Seq  # noqa: E402

# (alignment, refinement, per_task, form): every operator, placement and form at least once.
CASES = [
    ("add", "multiply", False, "vector"),
    ("multiply", "add", True, "network"),
    ("concat", "multiply", True, "factorised"),
    ("add", "add", False, "factorised"),
    ("none", "multiply", True, "vector"),
    ("concat", "none", False, "network"),
]


def trained_like(config: ml_collections.ConfigDict, seed: int = 1) -> Pix2Seq:
    """A model as if trained: implicit tensors far from their start (noise of std 0.3, not
    0.02) and no bias left at zero nor scale at one (std 0.05), so a wrong fold would show."""
    model = Pix2Seq(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(seed)
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            is_implicit = any(str(p).startswith(implicit.PREFIX) for p in path)
            value = np.asarray(variable[...])
            noise = rng.normal(0, 0.3 if is_implicit else 0.05, value.shape)
            variable[...] = jnp.asarray(value + noise, value.dtype)
    return model


def folded_model(model: Pix2Seq, config: ml_collections.ConfigDict):
    """(folded model, folded config, folded params) as export writes and load rebuilds them."""
    params = nnx.state(model, nnx.Param).to_pure_dict()
    full_config = ml_collections.ConfigDict({"model": config})
    folded, folded_config = export.fold_implicit(params, full_config)
    rebuilt = Pix2Seq(folded_config.model, rngs=nnx.Rngs(2))
    state = nnx.state(rebuilt, nnx.Param)
    nnx.replace_by_pure_dict(state, folded)
    nnx.update(rebuilt, state)
    return rebuilt, folded_config, folded


def paths(params: dict) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


@pytest.mark.parametrize("alignment, refinement, per_task, form", CASES)
def test_folded_model_has_no_implicit_parameters_and_the_same_logits(
    alignment, refinement, per_task, form
):
    config = config_with(alignment=alignment, refinement=refinement, per_task=per_task, form=form)
    model = trained_like(config)
    batch = batch_with_tasks()
    logits = np.asarray(forward(model, batch))
    rebuilt, folded_config, folded = folded_model(model, config)
    assert not [path for path in paths(folded) if "implicit" in path]
    assert implicit.parameter_overhead(folded)["implicit"] == 0
    assert folded_config.model.implicit.alignment == folded_config.model.implicit.refinement
    assert folded_config.model.implicit.task_final_norm == per_task
    np.testing.assert_allclose(np.asarray(forward(rebuilt, batch)), logits, rtol=1e-5, atol=1e-6)
    # The tensors folded matter: the same layers with them as initialised give other logits.
    initialised = Pix2Seq(config, rngs=nnx.Rngs(0))
    assert not np.allclose(np.asarray(forward(initialised, batch)), logits, atol=1e-3)


@pytest.mark.parametrize("method", ["greedy", "beam"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_folded_per_task_model_decodes_the_same_tokens(method, use_cache):
    config = config_with(alignment="concat", refinement="multiply", per_task=True)
    model = trained_like(config)
    rebuilt, _, _ = folded_model(model, config)
    batch = batch_with_tasks()
    prompt = jnp.asarray(np.asarray(batch["decoder_input"])[:, :, :1])  # [B, R, 1]
    options = decode.DecodeConfig(max_len=6, method=method, beam_size=2, use_cache=use_cache)
    tokens = [
        np.asarray(decode.generate(m, batch, prompt, jax.random.key(0), options)["tokens"])
        for m in (model, rebuilt)
    ]
    np.testing.assert_array_equal(tokens[0], tokens[1])


def test_folded_config_json_rebuilds_the_folded_parameter_shapes(tmp_path):
    config = config_with(alignment="concat", refinement="add", per_task=True, form="network")
    _, folded_config, folded = folded_model(trained_like(config), config)
    config_utils.save_config(folded_config, tmp_path / "config.json")
    loaded = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))
    abstract = nnx.eval_shape(lambda: Pix2Seq(loaded.model, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda x: x.shape, nnx.state(abstract, nnx.Param).to_pure_dict())
    assert shapes == jax.tree.map(lambda x: x.shape, folded)


def test_a_model_without_implicit_knowledge_is_exported_as_it_is():
    config = ml_collections.ConfigDict({"model": config_with()})
    params = nnx.state(Pix2Seq(config.model, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    folded, folded_config = export.fold_implicit(params, config)
    assert folded_config is config
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, folded, params))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"alignment": "add"}, r"alignment='add' folds into the decoder's cross-attention key"),
        ({"refinement": "add"}, r"refinement='add' folds into the final LayerNorm's bias"),
    ],
)
def test_a_fold_without_a_bias_to_go_into_raises_naming_the_fix(options, message):
    config = config_with(**options)
    config.decoder.use_bias = False
    params = nnx.state(Pix2Seq(config, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    with pytest.raises(ValueError, match=message + ".*use_bias=True"):
        export.fold_implicit(params, ml_collections.ConfigDict({"model": config}))
