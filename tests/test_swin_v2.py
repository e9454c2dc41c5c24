"""Swin V2 idioms (torchvision swin_v2_t).

* res-post-norm blocks, x + LN(attn(x)), where attn(x) ends with the window
  un-padding x[:, :H, :W] sliced with bounds read at run time: ONNX shape
  inference loses every dim there, the analysis keeps those of the axes the
  Slice leaves alone (and follows the LayerNormalization);
* the relative position bias table [positions, heads] read by GatherND at
  [window^2, 1] indices (the dynamo export; TorchScript writes a Gather):
  the heads axis is not gathered, so the units move with it.

The qkv bias zeroed by ScatterND is folded (test_folding).
"""

import numpy as np
import pytest

import onnx_net2net as n2n
from onnx_net2net.ir import GraphIR
from helpers import H, make_model, rand, widen_exact

D = 4


def _i64(*values):
    return np.array(values, dtype=np.int64)


def post_norm_past_a_runtime_slice():
    """h = embed(x); a = Slice(proj(h), [0, T) with T read from Shape(h));
    s = h + LN(a); y = head(s)."""
    rng = np.random.default_rng(0)
    inits = {"we": rand(rng, 3, D), "wp": rand(rng, D, D), "wo": rand(rng, D, 2), "g": 1 + rand(rng, D, scale=0.2),
             "b": rand(rng, D), "zero": _i64(0), "one": _i64(1), "two": _i64(2)}
    nodes = [H("MatMul", ["x", "we"], ["h"], name="embed"), H("MatMul", ["h", "wp"], ["a"], name="proj"),
             H("Shape", ["h"], ["hs"]), H("Slice", ["hs", "one", "two"], ["t"]),
             H("Slice", ["a", "zero", "t", "one"], ["cut"]),
             H("LayerNormalization", ["cut", "g", "b"], ["n"], axis=-1, name="norm"), H("Add", ["h", "n"], ["s"]),
             H("MatMul", ["s", "wo"], ["y"], name="head")]
    return make_model(nodes, [("x", ["N", 5, 3])], [("y", ["N", 5, 2])], inits)


def test_post_norm_past_a_slice_with_runtime_bounds_grows(monkeypatch):
    # onnxruntime's symbolic inference gives up on the whole swin_v2_t graph: here too
    monkeypatch.setattr(GraphIR, "_refine_with_symbolic_inference", lambda self, light: None)
    model = post_norm_past_a_runtime_slice()
    layer = next(l for l in n2n.inspect(model, trial=False)["layers"] if l["name"] == "embed")
    assert layer["widen"]["ok"] and sorted(layer["widen"]["group"]) == ["embed", "proj"], layer
    widen_exact(model, {"embed": 2 * D}, split="random")
    widen_exact(model, {"proj": D + 2})  # LEMON: the norm reads the producer's output directly


def gathered_table(depth=1):
    """A table computed per position, t = relu(c @ w1) [P, D], read at
    positions idx [K, depth] by GatherND (depth 2 picks single entries: the
    unit axis is gathered), then y = g @ w2."""
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 3, size=(6, depth)).astype(np.int64)
    inits = {"w1": rand(rng, 3, D), "w2": rand(rng, D, 2) if depth == 1 else rand(rng, 6, 2), "idx": idx}
    nodes = [H("MatMul", ["c", "w1"], ["t"], name="table"), H("Relu", ["t"], ["r"]),
             H("GatherND", ["r", "idx"], ["g"]), H("MatMul", ["g", "w2"], ["y"], name="read")]
    return make_model(nodes, [("c", [3, 3])], [("y", [6, 2] if depth == 1 else [2])], inits)


def test_gathernd_along_other_axes_moves_the_units():
    widen_exact(gathered_table(), {"table": 7}, split="random")


def test_gathernd_along_the_unit_axis_is_refused():
    model = gathered_table(depth=2)
    with pytest.raises(n2n.GrowthRefused, match="GatherND.*gathers along the unit axis"):
        n2n.widen(model, {"table": 7})
