"""gMLP's spatial gating unit, exported by TorchScript: `u, v = x.chunk(2, -1)`
becomes Shape -> Gather(-1) -> Add 1 -> Div 2 (-> Mul 1, Mul 2) -> Slice, bounds
read at run time on the unit axis. They hold h and 2h for a 2h-wide input
(the model fixes them), so the Slices act as constant ones: the projection's
output is one space repeated twice, u and v grow together (u * v pairs
channel i of each), and v's LayerNorm makes the widths multiples. The grown
model is fed the bounds' new values where the computed ones would not
follow (runtime_shapes)."""

import numpy as np
import pytest

import onnx_net2net as n2n
from helpers import H, make_model, rand, widen_exact

HIDDEN = 3


def _i64(*values):
    return np.array(values, dtype=np.int64)


def gated_block(norm=True, divisor=2, overlap=0):
    """x -> fc1 (2h) -> Relu -> u | v (runtime chunk, v shifted left by `overlap`);
    v -> LN -> token mix; u * v -> fc2 -> y."""
    rng = np.random.default_rng(0)
    half = (2 * HIDDEN + 1) // divisor  # the width of u and of v
    inits = {"w1": rand(rng, 4, 2 * HIDDEN), "overlap": _i64(overlap), "w2": rand(rng, half, 4), "wt": rand(rng, 5, 5),
             "g": 1 + rand(rng, half, scale=0.2), "b": rand(rng, half), "last": _i64(-1), "one": _i64(1),
             "divisor": _i64(divisor), "two": _i64(2), "zero": _i64(0)}
    v_nodes = ([H("LayerNormalization", ["v", "g", "b"], ["vn"], axis=-1, name="norm")] if norm
               else [H("Identity", ["v"], ["vn"])])
    nodes = [H("MatMul", ["x", "w1"], ["h"], name="fc1"), H("Relu", ["h"], ["a"]),
             H("Shape", ["a"], ["s"]), H("Gather", ["s", "last"], ["d"]), H("Add", ["d", "one"], ["d1"]),
             H("Div", ["d1", "divisor"], ["c"]), H("Mul", ["c", "one"], ["c1"]), H("Mul", ["c", "two"], ["c2"]),
             H("Sub", ["c1", "overlap"], ["v0"]), H("Sub", ["c2", "overlap"], ["v1"]),
             H("Slice", ["a", "zero", "c1", "last"], ["u"]), H("Slice", ["a", "v0", "v1", "last"], ["v"]),
             *v_nodes, H("Transpose", ["vn"], ["vt"], perm=[0, 2, 1]),
             H("MatMul", ["vt", "wt"], ["m"], name="tokens"), H("Transpose", ["m"], ["mt"], perm=[0, 2, 1]),
             H("Mul", ["u", "mt"], ["gated"]), H("MatMul", ["gated", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", ["N", 5, 4])], [("y", ["N", 5, 4])], inits)


def _fc1(model):
    return next(l for l in n2n.inspect(model, trial=False)["layers"] if l["name"] == "fc1")["widen"]


def test_chunk_with_runtime_bounds_grows_both_halves_by_multiples():
    model = gated_block()
    widen = _fc1(model)
    assert widen["ok"] and widen["step"] == 2 * HIDDEN, widen
    widen_exact(model, {"fc1": 4 * HIDDEN}, split="random")
    widen_exact(model, {"fc1": 6 * HIDDEN})


def test_chunk_with_runtime_bounds_without_a_norm_grows_by_pairs():
    model = gated_block(norm=False)
    assert _fc1(model)["step"] == 2
    widen_exact(model, {"fc1": 2 * HIDDEN + 4}, split="random")


def test_runtime_bounds_at_thirds_make_three_repeats():
    """c = (d + 1) // 3: u, v are the first two thirds (the last is unused):
    the space repeats three times, and the bounds follow each third."""
    model = gated_block(divisor=3)
    assert _fc1(model)["step"] == 6
    widen_exact(model, {"fc1": 12}, split="random")


def test_runtime_bounds_that_cut_through_the_units_are_refused():
    """v = [h - 1, 2h - 1): u and v overlap on one channel."""
    model = gated_block(overlap=1)
    widen = _fc1(model)
    assert not widen["ok"] and "Slice" in widen["reason"], widen


def test_non_multiples_are_refused_with_the_reason():
    with pytest.raises(n2n.UserError, match="multiple of 6"):
        n2n.widen(gated_block(), {"fc1": 2 * HIDDEN + 2})
