"""Products that contract the units: one side's copies share their unit's value.

EfficientViT's cascaded attention: one conv writes q | k | v, q goes through
a depthwise conv, and the scores are q^T k, a sum over the key channels.
Widening the key channels copies them in q and in k; the copies of k are
divided by their number (the conv's k rows and bias), so the sum is
unchanged. q and k hold one space in two parts of the conv's output, v
another (it is left as it is). Single-head attention written with separate
projections grows its head size the same way.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import H, infer_mapping, init, inspected, make_model, node, node_weight, rand, widen_exact

import onnx_net2net as n2n

C, KEY, SIDE = 8, 4, 3
POSITIONS = SIDE * SIDE


def _i64(*values):
    return np.array(values, np.int64)


def cascaded_head(v_size: int = 6, seed: int = 0, k_op: str | None = None, q_op: str | None = None,
                  k_also_read: bool = False):
    """x -> qkv conv (q | k | v, KEY, KEY and v_size channels) -> Split ->
    q: depthwise conv -> [1, KEY, N] -> * scale -> q^T; k: [1, KEY, N] ->
    scores q^T k -> softmax -> v @ attn^T -> [1, v, H, W] -> Relu -> proj -> y.
    `k_op` / `q_op`: an op inserted on k / q before the product; `k_also_read`:
    k is also added to the output through a 1x1 conv."""
    rng = np.random.default_rng(seed)
    width = 2 * KEY + v_size
    inits = {"qkv_w": rand(rng, width, C, 1, 1), "qkv_b": rand(rng, width), "dw_w": rand(rng, KEY, 1, 3, 3),
             "dw_b": rand(rng, KEY), "proj_w": rand(rng, 5, v_size, 1, 1), "proj_b": rand(rng, 5),
             "sizes": _i64(KEY, KEY, v_size), "flat_k": _i64(1, KEY, POSITIONS), "flat_v": _i64(1, v_size, POSITIONS),
             "map_v": _i64(1, v_size, SIDE, SIDE), "scale": np.array(0.5, np.float32)}
    nodes = [H("Conv", ["x", "qkv_w", "qkv_b"], ["qkv"], name="qkv"),
             H("Split", ["qkv", "sizes"], ["q", "k", "v"], name="split", axis=1),
             H("Conv", ["q", "dw_w", "dw_b"], ["q_dw"], name="dw", group=KEY, pads=[1, 1, 1, 1]),
             H("Reshape", ["q_dw", "flat_k"], ["q_flat"]), H("Mul", ["q_flat", "scale"], ["q_scaled"]),
             H("Transpose", ["q_scaled"], ["q_t"], perm=[0, 2, 1]),
             H("Reshape", ["k", "flat_k"], ["k_flat"])]
    q_in, k_in = "q_t", "k_flat"
    for op, name in ((k_op, "k"), (q_op, "q")):
        if op is not None:
            source = k_in if name == "k" else q_in
            nodes.append(H(op, [source], [f"{name}_{op}"]))
            k_in, q_in = (f"k_{op}", q_in) if name == "k" else (k_in, f"q_{op}")
    nodes += [H("MatMul", [q_in, k_in], ["scores"], name="scores"), H("Softmax", ["scores"], ["attn"], axis=-1),
              H("Reshape", ["v", "flat_v"], ["v_flat"]), H("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1]),
              H("MatMul", ["v_flat", "attn_t"], ["context"], name="context"),
              H("Reshape", ["context", "map_v"], ["context_map"]), H("Relu", ["context_map"], ["act"]),
              H("Conv", ["act", "proj_w", "proj_b"], ["y0"], name="proj")]
    if k_also_read:
        inits.update(side_w=rand(rng, 5, KEY, 1, 1))
        nodes += [H("Conv", ["k", "side_w"], ["side"], name="side"), H("Add", ["y0", "side"], ["y"])]
    else:
        nodes.append(H("Identity", ["y0"], ["y"]))
    return make_model(nodes, [("x", [1, C, SIDE, SIDE])], [("y", [1, 5, SIDE, SIDE])], inits)


@pytest.mark.parametrize("v_size", [6, KEY])
def test_q_and_k_grow_as_one_space_beside_v(v_size):
    model = cascaded_head(v_size)
    entry = inspected(model)["qkv"]["widen"]
    assert entry["ok"] and entry["step"] == 2
    assert inspected(model)["dw"]["widen"]["ok"]
    wider, _ = widen_exact(model, {"qkv": 2 * KEY + v_size + 2 * 3})
    onnx.checker.check_model(wider, full_check=True)
    assert node_weight(wider, "qkv").shape[0] == 2 * (KEY + 3) + v_size
    assert node_weight(wider, "dw").shape[0] == KEY + 3
    assert node_weight(wider, "proj").shape[1] == v_size  # v holds another space: left alone
    assert inspected(wider)["qkv"]["width"] == 2 * (KEY + 3) + v_size


def test_k_copies_share_the_value_of_their_unit():
    model = cascaded_head()
    wider, _ = widen_exact(model, {"qkv": 2 * KEY + 6 + 2 * 3})
    old, new = node_weight(model, "qkv"), node_weight(wider, "qkv")
    grown = KEY + 3
    g = infer_mapping(old[:KEY], new[:grown])  # q's rows are copies
    counts = np.bincount(g, minlength=KEY)
    assert counts.max() > 1
    np.testing.assert_allclose(new[grown:2 * grown], old[KEY:2 * KEY][g] / counts[g][:, None, None, None],
                               rtol=1e-6)  # k's rows: copies divided by their number
    np.testing.assert_array_equal(new[2 * grown:], old[2 * KEY:])  # v's rows


@pytest.mark.parametrize("options", [{"split": "random"}, {"split": "zero-sum"}, {"init": "zero"}])
def test_other_exact_initialisations_stay_exact(options):
    widen_exact(cascaded_head(), {"qkv": 2 * KEY + 6 + 2 * 3}, **options)


def test_a_nonlinear_side_is_not_divided_the_other_is():
    model = cascaded_head(k_op="Sigmoid")  # k's side is not linear; q's side (dw conv, scale) is
    assert inspected(model)["qkv"]["widen"]["ok"]
    widen_exact(model, {"qkv": 2 * KEY + 6 + 2 * 2})


def test_neither_side_linear_grows_v_alone():
    """q and k cannot grow (no side of q^T k can be divided); v, a part of
    its own, grows alone and q and k keep their width."""
    model = cascaded_head(k_op="Sigmoid", q_op="Tanh")
    assert inspected(model)["qkv"]["widen"]["ok"]
    wider, _ = widen_exact(model, {"qkv": 2 * KEY + 9})
    assert init(wider, node(wider, "split").input[1]).tolist() == [KEY, KEY, 9]


def test_neither_side_linear_with_v_beside_nothing_is_refused():
    """With q | k alone in the output (no v), nothing grows: the reason names the product."""
    rng = np.random.default_rng(0)
    inits = {"w": rand(rng, 2 * KEY, C, 1, 1), "sizes": _i64(KEY, KEY), "flat": _i64(1, KEY, POSITIONS)}
    nodes = [H("Conv", ["x", "w"], ["qk"], name="qk"), H("Split", ["qk", "sizes"], ["q", "k"], axis=1),
             H("Reshape", ["q", "flat"], ["qf"]), H("Reshape", ["k", "flat"], ["kf"]), H("Tanh", ["qf"], ["qt"]),
             H("Sigmoid", ["kf"], ["ks"]), H("Transpose", ["qt"], ["qT"], perm=[0, 2, 1]),
             H("MatMul", ["qT", "ks"], ["y"])]
    model = make_model(nodes, [("x", [1, C, SIDE, SIDE])], [("y", [1, POSITIONS, POSITIONS])], inits)
    entry = inspected(model)["qk"]["widen"]
    assert not entry["ok"]
    assert "contracts the units" in entry["reason"] and "not linear" in entry["reason"]


def test_k_read_elsewhere_divides_q_instead():
    model = cascaded_head(k_also_read=True)  # dividing k would change the side conv: q's rows are divided
    widen_exact(model, {"qkv": 2 * KEY + 6 + 2 * 3})


def test_whole_model_widens_with_a_factor():
    wider, report = widen_exact(cascaded_head(), factor=1.5)
    change = next(change for change in report["changes"] if "qkv" in change["layers"])
    # q and k (8 features) grow 1.5x to 12, v's 6 features keep their number
    assert (change["old_width"], change["new_width"]) == (14, 18)
    assert node_weight(wider, "qkv").shape[0] == 18


def single_head(seed: int = 0):
    """x [B, T, D] -> q, k, v projections (MatMul + Add bias) -> softmax(q k^T) v -> out -> y: no heads axis."""
    rng = np.random.default_rng(seed)
    d = 6
    inits = {"w_out": rand(rng, d, 3)}
    nodes = []
    for p in "qkv":
        inits[f"w_{p}"], inits[f"b_{p}"] = rand(rng, d, d), rand(rng, d)
        nodes += [H("MatMul", ["x", f"w_{p}"], [f"{p}0"], name=f"{p}_proj"), H("Add", [f"{p}0", f"b_{p}"], [p])]
    nodes += [H("Transpose", ["k"], ["kT"], perm=[0, 2, 1]), H("MatMul", ["q", "kT"], ["scores"]),
              H("Softmax", ["scores"], ["probs"], axis=-1), H("MatMul", ["probs", "v"], ["context"]),
              H("MatMul", ["context", "w_out"], ["y"], name="out")]
    return make_model(nodes, [("x", [2, 5, d])], [("y", [2, 5, 3])], inits)


def test_single_head_grows_its_head_size_by_one():
    model = single_head()
    entry = inspected(model)["q_proj"]["widen"]
    assert entry["ok"] and entry["step"] == 1
    wider, _ = widen_exact(model, {"q_proj": 7})
    assert node_weight(wider, "k_proj").shape[1] == 7
    assert node_weight(wider, "v_proj").shape[1] == 6  # v is its own space
    assert n2n.inspect(wider, trial=False)["layers"][0]["width"] == 7


def gated_head(v_and_g_are_outputs: bool = False, seed: int = 0):
    """x -> one conv writing q | k | v | g (4 equal parts) -> q^T k -> softmax
    -> v @ attn^T, gated by sigmoid(g) -> proj -> y. q and k hold one space,
    v and g another; `v_and_g_are_outputs`: v and g are also graph outputs."""
    rng = np.random.default_rng(seed)
    inits = {"w": rand(rng, 4 * KEY, C, 1, 1), "b": rand(rng, 4 * KEY), "sizes": _i64(KEY, KEY, KEY, KEY),
             "flat": _i64(1, KEY, POSITIONS), "proj_w": rand(rng, KEY, 5)}
    nodes = [H("Conv", ["x", "w", "b"], ["qkvg"], name="qkvg"),
             H("Split", ["qkvg", "sizes"], ["q", "k", "v", "g"], name="split", axis=1)]
    nodes += [H("Reshape", [p, "flat"], [f"{p}_flat"]) for p in "qkvg"]
    nodes += [H("Transpose", ["q_flat"], ["q_t"], perm=[0, 2, 1]), H("MatMul", ["q_t", "k_flat"], ["scores"]),
              H("Softmax", ["scores"], ["attn"], axis=-1), H("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1]),
              H("MatMul", ["v_flat", "attn_t"], ["context"]), H("Sigmoid", ["g_flat"], ["gate"]),
              H("Mul", ["context", "gate"], ["gated"]), H("Transpose", ["gated"], ["gated_t"], perm=[0, 2, 1]),
              H("MatMul", ["gated_t", "proj_w"], ["y"], name="proj")]
    outputs = [("y", [1, POSITIONS, 5])] + ([("v", [1, KEY, SIDE, SIDE]), ("g", [1, KEY, SIDE, SIDE])]
                                             if v_and_g_are_outputs else [])
    return make_model(nodes, [("x", [1, C, SIDE, SIDE])], outputs, inits)


@pytest.mark.parametrize("v_and_g_are_outputs", [False, True])
def test_q_and_k_among_four_equal_parts(v_and_g_are_outputs):
    """Of q | k | v | g the neighbouring pair q, k is tried first: v and g
    (another space, here possibly graph outputs) keep their channels."""
    model = gated_head(v_and_g_are_outputs)
    entry = inspected(model)["qkvg"]["widen"]
    assert entry["ok"] and entry["step"] == 2, entry["reason"]
    wider, _ = widen_exact(model, {"qkvg": 4 * KEY + 2 * 3})
    assert node_weight(wider, "proj").shape[0] == KEY


@pytest.mark.parametrize("k_op", [None, "Sigmoid"])
def test_fresh_new_units_are_zero_on_the_divided_side(k_op):
    """init="fresh": q's (or, when k is not linear, k's) new rows are fresh, the divided side's are zero, so
    q^T k is unchanged."""
    model = cascaded_head(k_op=k_op)
    wider, _ = widen_exact(model, {"qkv": 2 * KEY + 6 + 2 * 3}, init="fresh", seed=1)
    old, new = node_weight(model, "qkv"), node_weight(wider, "qkv")
    grown = KEY + 3
    q_rows, k_rows = new[KEY:grown], new[grown + KEY:2 * grown]
    fresh, divided = (q_rows, k_rows) if k_op is None else (k_rows, q_rows)
    assert np.all(fresh != 0) and not divided.any()
    np.testing.assert_array_equal(new[:KEY], old[:KEY])
    np.testing.assert_array_equal(new[grown:grown + KEY], old[KEY:2 * KEY])   # old units: not divided
    np.testing.assert_array_equal(new[2 * grown:], old[2 * KEY:])
