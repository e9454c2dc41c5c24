"""keep_output_shapes: an encoder whose hidden state is a graph output widens
its residual stream, and the output is sliced back to the original units.
Exact under tiling and under LEMON's average expansion (original units keep
their values through every LayerNormalization); refused without the option."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_net2net as n2n

from helpers import H, make_model, rand, widen_exact

D = 8


def encoder(extra_output: bool = False):
    """Pre-norm, like CLIP's vision tower: x -> inp -> e; r = e + fc2(Gelu(fc1(LN(e))));
    last_hidden = LN(r) (and, with `extra_output`, concat(x, last_hidden) as a second output)."""
    rng = np.random.default_rng(0)
    inits = {"w_in": rand(rng, 4, D), "w1": rand(rng, D, 2 * D), "w2": rand(rng, 2 * D, D),
             "g1": rand(rng, D) + 1, "b1": rand(rng, D), "g2": rand(rng, D) + 1, "b2": rand(rng, D)}
    nodes = [H("MatMul", ["x", "w_in"], ["e"], name="inp"),
             H("LayerNormalization", ["e", "g1", "b1"], ["h"], axis=-1),
             H("MatMul", ["h", "w1"], ["m1"], name="fc1"), H("Gelu", ["m1"], ["a"], domain=""),
             H("MatMul", ["a", "w2"], ["m2"], name="fc2"), H("Add", ["e", "m2"], ["r"]),
             H("LayerNormalization", ["r", "g2", "b2"], ["last_hidden"], axis=-1)]
    outputs = [("last_hidden", ["N", 3, D])]
    if extra_output:
        nodes.append(H("Concat", ["x", "last_hidden"], ["with_input"], axis=-1))
        outputs.append(("with_input", ["N", 3, 4 + D]))
    return make_model(nodes, [("x", ["N", 3, 4])], outputs, inits, opset=20)


def test_stream_reaching_an_output_is_refused_without_the_option():
    layer = next(l for l in n2n.inspect(encoder(), trial=False)["layers"] if l["name"] == "inp")
    assert "graph output 'last_hidden'" in layer["widen"]["reason"]


@pytest.mark.parametrize("width", [16, 12])  # tiling, LEMON's average expansion
def test_stream_widens_and_the_hidden_state_is_sliced_back(width):
    grown, report = widen_exact(encoder(), {"inp": width}, keep_output_shapes=True)
    assert report["changes"][0]["sliced_outputs"] == ["last_hidden"]
    assert report["changes"][0]["new_width"] == width
    weight = next(i for i in grown.graph.initializer if i.name.startswith("w1"))
    assert list(weight.dims) == [width, 2 * D]


def test_an_output_holding_the_units_at_an_offset_keeps_its_other_data():
    grown, report = widen_exact(encoder(extra_output=True), {"inp": 12}, keep_output_shapes=True)
    assert sorted(report["changes"][0]["sliced_outputs"]) == ["last_hidden", "with_input"]
    assert [o.name for o in grown.graph.output] == ["last_hidden", "with_input"]


def test_factor_with_kept_outputs_grows_the_stream_and_the_mlp():
    grown, report = widen_exact(encoder(), factor=2, keep_output_shapes=True)
    assert len(report["changes"]) == 2
