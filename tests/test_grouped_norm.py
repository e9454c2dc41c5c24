"""A normalisation over units that a grouped convolution also reads (wav2vec2's
positional convolution inside a post-norm stream): tiling copies unit j of
n to j + n, which moves units between the convolution's groups. The group
must be refused whichever layer the walk starts from (the walk meets the norm
before or after the convolution), never claimed growable and then crash."""

import numpy as np
import pytest

import onnx_net2net as n2n
from helpers import H, make_model, rand


def stream_with_grouped_conv(groups=4, d=16):
    """proj -> h + Transpose(GroupedConv(Transpose(h))) -> LN -> LN(. + fc2(relu(fc1(.)))) -> head."""
    rng = np.random.default_rng(0)
    inits = {"P": rand(rng, 8, d), "C": rand(rng, d, d // groups, 3), "F1": rand(rng, d, 2 * d), "F2": rand(rng, 2 * d, d), "O": rand(rng, d, 5),
             "g0": 1 + rand(rng, d, scale=0.1), "b0": rand(rng, d, scale=0.1),
             "g1": 1 + rand(rng, d, scale=0.1), "b1": rand(rng, d, scale=0.1)}
    nodes = [H("MatMul", ["x", "P"], ["h"], name="proj"),
             H("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
             H("Conv", ["ht", "C"], ["ct"], name="pos", group=groups, pads=[1, 1]),
             H("Transpose", ["ct"], ["c"], perm=[0, 2, 1]),
             H("Add", ["h", "c"], ["s"]),
             H("LayerNormalization", ["s", "g0", "b0"], ["n0"], axis=-1),
             H("MatMul", ["n0", "F1"], ["u"], name="fc1"), H("Relu", ["u"], ["r"]),
             H("MatMul", ["r", "F2"], ["f"], name="fc2"),
             H("Add", ["n0", "f"], ["s1"]),
             H("LayerNormalization", ["s1", "g1", "b1"], ["n1"], axis=-1),
             H("MatMul", ["n1", "O"], ["y"], name="head")]
    return make_model(nodes, [("x", ["N", 6, 8])], [("y", ["N", 6, 5])], inits)


@pytest.mark.parametrize("layer", ["proj", "pos", "fc2"])
def test_grouped_conv_under_a_norm_is_refused_from_every_layer(layer):
    report = {l["name"]: l for l in n2n.inspect(stream_with_grouped_conv(), trial=False)["layers"]}
    widen = report[layer]["widen"]
    assert "grouped-convolution units" in widen["reason"], widen
    with pytest.raises(n2n.GrowthRefused, match="grouped-convolution units"):
        n2n.widen(stream_with_grouped_conv(), {layer: 32})


def test_factor_growth_skips_the_refused_stream_and_verifies():
    grown, report = n2n.widen(stream_with_grouped_conv(), factor=1.5)
    assert report["verification"]["passed"]
    assert [c["layers"] for c in report["changes"]] == [["fc1"]], report["changes"]
