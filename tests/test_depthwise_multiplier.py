"""Depthwise convolutions with several filters per input channel (FastViT's
downsampling: group = input channels, 2 outputs each) couple two spaces: a
unit of the input is a block of `multiplier` channels of the output. So a
layer writing the output space, here on a residual stream, grows in blocks of
whole filter groups (step = multiplier), and growing the input grows the
output stream with it, each copy of a channel bringing its block."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_net2net as n2n

from helpers import H, inspected_widen, make_model, rand, widen_exact

C, M = 3, 2  # input channels of the depthwise conv, filters per channel


def multiplier_stream():
    """x -> conv_a (C) -> Relu -> dw (C*M, group C) -> s; s + conv_b(s) -> Relu -> head."""
    rng = np.random.default_rng(0)
    inits = {"wa": rand(rng, C, 2, 1, 1), "ba": rand(rng, C), "wd": rand(rng, C * M, 1, 3, 3), "bd": rand(rng, C * M),
             "wb": rand(rng, C * M, C * M, 1, 1), "bb": rand(rng, C * M), "wh": rand(rng, 3, C * M, 1, 1)}
    nodes = [H("Conv", ["x", "wa", "ba"], ["a"], name="conv_a"), H("Relu", ["a"], ["ar"]),
             H("Conv", ["ar", "wd", "bd"], ["s"], name="dw", group=C, pads=[1, 1, 1, 1]),
             H("Conv", ["s", "wb", "bb"], ["b"], name="conv_b"), H("Add", ["s", "b"], ["sum"]),
             H("Relu", ["sum"], ["r"]), H("Conv", ["r", "wh"], ["y"], name="head")]
    return make_model(nodes, [("x", ["N", 2, 6, 6])], ["y"], inits)


def test_the_output_stream_grows_in_whole_filter_groups():
    widen = inspected_widen(multiplier_stream(), "conv_b")
    assert widen["ok"], widen["reason"]
    assert widen["step"] == M and set(widen["group"]) >= {"conv_a", "conv_b"}
    grown, _ = widen_exact(multiplier_stream(), {"conv_b": C * M + 2 * M})
    dw = next(n for n in grown.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == C + 2


def test_growing_the_input_grows_the_output_stream_by_blocks():
    widen = inspected_widen(multiplier_stream(), "conv_a")
    assert widen["ok"], widen["reason"]
    assert widen["step"] == 1
    grown, _ = widen_exact(multiplier_stream(), {"conv_a": C + 2}, split="random", seed=3)
    conv_b = next(i for i in grown.graph.initializer if i.name.startswith("wb"))
    assert list(conv_b.dims)[:2] == [(C + 2) * M, (C + 2) * M]


def test_part_of_a_filter_group_is_refused():
    with pytest.raises(n2n.UserError, match=f"multiple of {M}"):
        n2n.widen(multiplier_stream(), {"conv_b": C * M + 1})
