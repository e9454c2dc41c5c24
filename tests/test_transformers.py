"""Transformers shipped in models/ (tools/export_transformers.py): attention
heads, the MLP, the residual stream with LayerNorm tiling, and block deepening."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_net2net as n2n

from helpers import MODELS, assert_same_function, deepen_exact, widen_exact

BERT = MODELS / "bert_tiny.onnx"
VIT = MODELS / "vit_tiny.onnx"
Q0 = "/model/bert/encoder/layer.0/attention/self/query/MatMul"
K0 = "/model/bert/encoder/layer.0/attention/self/key/MatMul"
V0 = "/model/bert/encoder/layer.0/attention/self/value/MatMul"
FFN0 = "/model/bert/encoder/layer.0/intermediate/dense/MatMul"
OUT0 = "/model/bert/encoder/layer.0/output/dense/MatMul"


@pytest.fixture(scope="module")
def bert_layers():
    return {layer["name"]: layer for layer in n2n.inspect(BERT, trial=False)["layers"]}


def _weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    inits = {t.name: t for t in model.graph.initializer}
    return onnx.numpy_helper.to_array(inits[node.input[1]])


def test_attention_heads_are_the_units(bert_layers):
    layer = bert_layers[Q0]
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    assert layer["widen"]["step"] == 16  # head size: widths grow by whole heads
    assert set(layer["widen"]["group"]) == {Q0, K0, V0}


def test_widen_attention_by_two_heads_is_exact():
    grown, report = widen_exact(BERT, {Q0: 96})
    assert report["verification"]["passed"] and report["verification"]["max_rel"] < 1e-5
    for name in (Q0, K0, V0):
        assert _weight(grown, name).shape == (64, 96)
    # The head count constants of the reshapes follow: 4 heads -> 6 (widen_exact ran the model).


def test_widen_attention_refuses_partial_heads():
    with pytest.raises(n2n.UserError, match="multiple of 16"):
        n2n.widen(BERT, {Q0: 72})


def test_widen_mlp_hidden_layer_through_erf_gelu():
    grown, report = widen_exact(BERT, {FFN0: 200}, split="random", seed=3)
    assert report["verification"]["passed"]
    assert _weight(grown, FFN0).shape == (64, 200)
    assert _weight(grown, OUT0).shape == (200, 64)


def test_residual_stream_tiles_through_layernorm(bert_layers):
    layer = bert_layers[OUT0]
    assert layer["widen"]["ok"], layer["widen"]["reason"]
    assert layer["widen"]["step"] == 64  # LayerNorm over the stream: multiples only
    assert len(layer["widen"]["group"]) >= 5  # embeddings and every writer of the stream
    grown, report = widen_exact(BERT, {OUT0: 128})
    assert report["verification"]["passed"]
    tables = [t for t in grown.graph.initializer if t.name.endswith("word_embeddings.weight")]
    assert tables and tuple(tables[0].dims) == (100, 128)


def test_residual_stream_refuses_uneven_width():
    with pytest.raises(n2n.UserError, match="multiple of 64"):
        n2n.widen(BERT, {OUT0: 96})


def test_every_bert_layer_not_at_the_output_grows_and_deepens(bert_layers):
    eligible = [l for l in bert_layers.values() if "graph output" not in (l["widen"]["reason"] or "")]
    assert eligible and all(l["widen"]["ok"] and l["deepen"]["ok"] for l in eligible)


def test_factor_two_on_vit_is_exact():
    grown, report = widen_exact(VIT, factor=2)
    assert report["verification"]["passed"]
    assert report["parameters"]["after"] > 3 * report["parameters"]["before"]


@pytest.mark.parametrize("model, layer", [
    (VIT, "/model/layers.0/attention/o_proj/MatMul"),
    (VIT, "/model/layers.1/mlp/fc2/MatMul"),
    (BERT, OUT0),
])
def test_block_deepening_is_exact(model, layer):
    before = onnx.load(str(model))
    grown, report = deepen_exact(model, [layer], mode="block")
    change = report["changes"][0]
    assert change["mode"] == "block" and change["zeroed"]
    assert len(grown.graph.node) >= len(before.graph.node) + 8
    assert report["verification"]["passed"] and report["verification"]["max_abs"] == 0


def test_block_deepening_copies_attention_and_mlp_together():
    _, report = n2n.deepen(VIT, ["/model/layers.0/attention/o_proj/MatMul"], mode="block")
    zeroed = report["changes"][0]["zeroed"]
    assert zeroed == ["/model/layers.0/attention/o_proj/MatMul", "/model/layers.0/mlp/fc2/MatMul"]


def test_block_deepening_refuses_a_plain_layer():
    with pytest.raises(n2n.GrowthRefused, match="residual stream"):
        n2n.deepen(MODELS / "mlp.onnx", ["/0/Gemm"], mode="block")


def test_fresh_block_is_exact_and_not_a_copy():
    layer = "/model/layers.0/attention/o_proj/MatMul"
    grown, report = deepen_exact(VIT, [layer], mode="fresh-block", seed=4)
    change = report["changes"][0]
    assert change["mode"] == "fresh-block" and report["verification"]["max_abs"] == 0
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in grown.graph.initializer}
    new = {name: value for name, value in inits.items() if name in change["initializers"]}
    weights = [name for name in new if "onnx::MatMul" in name]
    assert len(weights) == 6  # q, k, v, o, fc1, fc2
    for name in weights:
        original = inits[name.split("/block0/", 1)[1]]
        zeroed = not new[name].any()
        assert zeroed or not np.allclose(new[name], original), name
    assert sum(not new[name].any() for name in weights) == 2  # o and fc2 hold the block at zero
    layer_norms = [name for name in new if "layernorm" in name]
    assert len(layer_norms) == 4  # both norms' scale and shift: reset to 1 and 0
    assert all(np.all(new[name] == (1 if name.endswith("weight") else 0)) for name in layer_norms)
    biases = [name for name in new if name.endswith(".bias") and "layernorm" not in name]
    assert len(biases) == 6 and not any(new[name].any() for name in biases)  # q, k, v, o, fc1, fc2


GPT2 = MODELS / "gpt2_tiny.onnx"
GPT2_QKV = "/model/transformer/h.0/attn/c_attn/Gemm"
GPT2_STREAM = "/model/transformer/h.0/attn/c_proj/Gemm"
GPT2_FC = "/model/transformer/h.1/mlp/c_fc/Gemm"


def test_gpt2_every_layer_not_at_the_output_grows_and_deepens():
    layers = n2n.inspect(GPT2, trial=False)["layers"]
    eligible = [l for l in layers if "graph output" not in (l["widen"]["reason"] or "")]
    assert len(eligible) == 8 and all(l["widen"]["ok"] and l["deepen"]["ok"] for l in eligible)
    steps = {l["name"]: l["widen"]["step"] for l in eligible}
    assert steps[GPT2_QKV] == 3 * 16 and steps[GPT2_STREAM] == 1 and steps[GPT2_FC] == 1


@pytest.mark.parametrize("layer, width", [(GPT2_QKV, 192 + 2 * 48), (GPT2_STREAM, 80), (GPT2_STREAM, 128),
                                          (GPT2_FC, 300)])
def test_gpt2_widening_is_exact(layer, width):
    grown, report = widen_exact(GPT2, {layer: width}, split="random", seed=5)
    assert report["verification"]["passed"] and report["verification"]["max_rel"] < 1e-5
    gemm = next(n for n in grown.graph.node if n.name == layer)
    weight = next(t for t in grown.graph.initializer if t.name == gemm.input[1])
    assert weight.dims[1] == width


@pytest.mark.parametrize("mode", ["block", "fresh-block"])
def test_gpt2_block_deepening_is_exact(mode):
    grown, report = deepen_exact(GPT2, [GPT2_STREAM], mode=mode)
    assert report["verification"]["passed"] and report["verification"]["max_abs"] == 0
    assert report["changes"][0]["zeroed"] == [GPT2_STREAM, "/model/transformer/h.0/mlp/c_proj/Gemm"]


def test_block_selectors_pick_one_layer_per_block():
    from onnx_net2net.passes import DeepenPass
    from onnx_net2net.rewrites.deeper import DeepenOptions

    model = onnx.load(str(VIT))
    result = DeepenPass("all", DeepenOptions(mode="block"))(model)
    assert len(result.report["changes"]) == 2  # two pre-norm blocks: each copied once, not once per writer
    assert_same_function(model, result.model)


def test_block_modes_refuse_options_they_do_not_use():
    with pytest.raises(n2n.UserError, match="`noise`: not used by `mode=block`"):
        n2n.deepen(VIT, ["/model/layers.0/attention/o_proj/MatMul"], mode="block", noise=0.1)
