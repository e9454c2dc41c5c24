"""A concatenation of aligned tensors holds one unit space several times.

GhostNet's ghost module concatenates a primary convolution's output with a
depthwise convolution of it (one filter per channel): [P | dw(P)] holds the
primary's units twice, and a ghost bottleneck adds such a concat to its
shortcut, so the stem before it produces the same units twice ([S | S]).
DLA's root concatenates relu(f(x) + x) with x, sometimes with other tensors
between them (repeats at uneven offsets). Growing the space grows every
repeat; a slice keeping part of a repeat, or an op moving the positions of
units repeated at uneven offsets, is refused."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_net2net as n2n

from helpers import H, inspected_widen, make_model, rand, widen_exact


def _conv(name, x, y, inits, rng, c_out, c_in, k=1, group=1):
    inits[f"{name}_w"] = rand(rng, c_out, c_in // group, k, k)
    inits[f"{name}_b"] = rand(rng, c_out)
    return H("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, pads=[k // 2] * 4, group=group)


def _ghost(tag, x, y, inits, rng, c_in, init, out, relu=True):
    """primary (1x1) -> cheap (depthwise 3x3) -> concat -> slice [:, :out]."""
    act = (lambda t, o: [H("Relu", [t], [o])]) if relu else (lambda t, o: [H("Identity", [t], [o])])
    inits[f"{tag}_starts"], inits[f"{tag}_ends"] = np.array([0], np.int64), np.array([out], np.int64)
    inits[f"{tag}_axes"] = np.array([1], np.int64)
    return ([_conv(f"primary{tag}", x, f"{tag}_p0", inits, rng, init, c_in)] + act(f"{tag}_p0", f"{tag}_p")
            + [_conv(f"cheap{tag}", f"{tag}_p", f"{tag}_d0", inits, rng, init, init, k=3, group=init)]
            + act(f"{tag}_d0", f"{tag}_d")
            + [H("Concat", [f"{tag}_p", f"{tag}_d"], [f"{tag}_cat"], axis=1),
               H("Slice", [f"{tag}_cat", f"{tag}_starts", f"{tag}_ends", f"{tag}_axes"], [y])])


def ghost_bottleneck(mid_out: int = 6):
    """stem (8) -> ghost1 (mid) -> depthwise -> BN -> squeeze-excite -> ghost2 (8) + stem -> depthwise -> head."""
    rng = np.random.default_rng(0)
    inits = {"bn_s": rand(rng, mid_out) + 1, "bn_b": rand(rng, mid_out), "bn_m": rand(rng, mid_out),
             "bn_v": np.abs(rand(rng, mid_out)) + 0.5}
    mid = -(-mid_out // 2)
    nodes = [_conv("stem", "x", "s0", inits, rng, 8, 4, k=3), H("Relu", ["s0"], ["s"])]
    nodes += _ghost("1", "s", "g1", inits, rng, 8, mid, mid_out)
    nodes += [_conv("conv_dw", "g1", "g1d", inits, rng, mid_out, mid_out, k=3, group=mid_out),
              H("BatchNormalization", ["g1d", "bn_s", "bn_b", "bn_m", "bn_v"], ["g1n"]),
              H("GlobalAveragePool", ["g1n"], ["se_pool"]),
              _conv("se_reduce", "se_pool", "se_r0", inits, rng, 2, mid_out), H("Relu", ["se_r0"], ["se_r"]),
              _conv("se_expand", "se_r", "se_e0", inits, rng, mid_out, 2), H("Sigmoid", ["se_e0"], ["se_e"]),
              H("Mul", ["g1n", "se_e"], ["h"])]
    nodes += _ghost("2", "h", "g2", inits, rng, mid_out, 4, 8, relu=False)
    nodes += [H("Add", ["g2", "s"], ["stream"]), _conv("stream_dw", "stream", "sd", inits, rng, 8, 8, k=3, group=8),
              _conv("head", "sd", "y", inits, rng, 3, 8)]
    return make_model(nodes, [("x", ["N", 4, 6, 6])], ["y"], inits)


def dla_root(extra_input: bool = False, sliced: bool = False):
    """t1 = relu(conv_a(x) + project(x)); t2 = relu(conv_b(t1) + t1); root(concat(t2, x, t1) or concat(t2, t1)),
    `sliced`: the concat's first 12 channels only."""
    rng = np.random.default_rng(1)
    inits = {}
    nodes = [_conv("project", "x", "pr", inits, rng, 5, 4), _conv("conv_a", "x", "a", inits, rng, 5, 4, k=3),
             H("Add", ["a", "pr"], ["t1a"]), H("Relu", ["t1a"], ["t1"]),
             _conv("conv_b", "t1", "b", inits, rng, 5, 5, k=3), H("Add", ["b", "t1"], ["t2a"]),
             H("Relu", ["t2a"], ["t2"]),
             H("Concat", ["t2", "x", "t1"] if extra_input else ["t2", "t1"], ["cat0"], axis=1)]
    if sliced:
        inits.update(s0=np.array([0], np.int64), s1=np.array([12], np.int64), s2=np.array([1], np.int64))
        nodes.append(H("Slice", ["cat0", "s0", "s1", "s2"], ["cat"]))
    else:
        nodes.append(H("Identity", ["cat0"], ["cat"]))
    width = 12 if sliced else 14 if extra_input else 10
    nodes += [_conv("root", "cat", "r", inits, rng, 3, width), H("Relu", ["r"], ["y"])]
    return make_model(nodes, [("x", ["N", 4, 5, 5])], ["y"], inits)


def test_a_ghost_modules_primary_grows_with_its_cheap_copy():
    widen = inspected_widen(ghost_bottleneck(), "primary1")
    assert widen["ok"], widen["reason"]
    assert widen["step"] == 1 and "cheap1" in widen["group"]
    grown, _ = widen_exact(ghost_bottleneck(), {"primary1": 5})
    se_reduce = next(i for i in grown.graph.initializer if i.name.startswith("se_reduce_w"))
    assert list(se_reduce.dims)[:2] == [2, 10]  # both halves of [P | dw(P)] grew


def test_the_residual_stream_holds_the_primarys_units_twice():
    widen = inspected_widen(ghost_bottleneck(), "primary2")
    assert widen["ok"], widen["reason"]
    assert "stem" in widen["group"]
    widen_exact(ghost_bottleneck(), {"primary2": 6})
    stem = inspected_widen(ghost_bottleneck(), "stem")
    assert stem["ok"] and stem["step"] == 2, stem
    widen_exact(ghost_bottleneck(), {"stem": 12})
    with pytest.raises(n2n.UserError, match="multiple of 2"):
        n2n.widen(ghost_bottleneck(), {"stem": 11})


def test_a_squeeze_excite_expansion_grows_in_both_repeats():
    widen = inspected_widen(ghost_bottleneck(), "se_expand")
    assert widen["ok"] and widen["step"] == 2, widen
    widen_exact(ghost_bottleneck(), {"se_expand": 10})


def test_a_slice_keeping_part_of_a_repeat_is_refused():
    widen = inspected_widen(ghost_bottleneck(mid_out=5), "primary1")
    assert not widen["ok"]
    assert "cuts through the repeats of the units (it keeps positions [0, 5) of 2 repeats of 3)" in widen["reason"]


def test_dla_root_concatenates_the_same_units_twice():
    widen = inspected_widen(dla_root(), "conv_a")
    assert widen["ok"], widen["reason"]
    assert {"conv_a", "conv_b", "project"} <= set(widen["group"])
    grown, _ = widen_exact(dla_root(), {"conv_a": 8})
    root = next(i for i in grown.graph.initializer if i.name.startswith("root_w"))
    assert list(root.dims)[:2] == [3, 16]


def test_the_same_units_with_another_input_between_them():
    widen = inspected_widen(dla_root(extra_input=True), "conv_a")
    assert widen["ok"], widen["reason"]
    grown, _ = widen_exact(dla_root(extra_input=True), {"conv_a": 7})
    root = next(i for i in grown.graph.initializer if i.name.startswith("root_w"))
    assert list(root.dims)[:2] == [3, 18]


def test_units_at_uneven_offsets_are_refused_where_an_op_moves_positions():
    widen = inspected_widen(dla_root(extra_input=True, sliced=True), "conv_a")
    assert not widen["ok"]
    assert "which cut a repeat of the units" in widen["reason"]


def test_a_depthwise_convolution_of_a_ghost_module_grows_both_halves():
    """Seeded from the depthwise convolution reading [P | dw(P)]: a channel
    routing region would see each channel of P twice and grow one copy only
    (it claimed any width, and changed the function); the repeated space
    grows both halves."""
    widen = inspected_widen(ghost_bottleneck(), "conv_dw")
    assert widen["ok"] and widen["step"] == 2, widen
    assert "routing" not in (widen["note"] or "")
    widen_exact(ghost_bottleneck(), {"conv_dw": 8})


def ghost_then_depthwise():
    """primary (3) -> concat(p, cheap(p)) -> slice -> depthwise conv_dw (6) -> head: no residual, no SE."""
    rng = np.random.default_rng(2)
    inits = {}
    nodes = _ghost("1", "x", "g", inits, rng, 4, 3, 6)
    nodes += [_conv("conv_dw", "g", "h0", inits, rng, 6, 6, k=3, group=6), H("Relu", ["h0"], ["h"]),
              _conv("head", "h", "y", inits, rng, 2, 6)]
    return make_model(nodes, [("x", ["N", 4, 5, 5])], ["y"], inits)


def test_a_channel_reaching_a_reader_twice_is_no_routing_region():
    """The routing region claimed conv_dw at any width (step 1) and its
    rewrite changed the function (max rel err 0.87): its fates count which
    readers a channel reaches, not at how many positions."""
    widen = inspected_widen(ghost_then_depthwise(), "conv_dw")
    assert widen["ok"] and widen["step"] == 2, widen
    assert "routing" not in (widen["note"] or "")
    widen_exact(ghost_then_depthwise(), {"conv_dw": 8})
    with pytest.raises(n2n.UserError, match="multiple of 2"):
        n2n.widen(ghost_then_depthwise(), {"conv_dw": 7})


def test_factor_grows_a_space_seeded_from_the_stem_and_the_primary_once():
    """The stem ([S | S], 2 features per unit) and ghost2's primary (S once)
    seed the same space: `--factor` grows it once, to 1.5x."""
    grown, report = widen_exact(ghost_bottleneck(), factor=1.5)
    producer_sets = [frozenset(change["layers"]) for change in report["changes"]]
    assert len(producer_sets) == len(set(producer_sets))
    stem = next(i for i in grown.graph.initializer if i.name.startswith("stem_w"))
    assert stem.dims[0] == 12
