"""Decisions the walk defers (Walk.settle) and the rules around them, attacked:
graphs where `inspect` once claimed a layer growable that `widen` then could
not grow exactly (a Split decided from one output only, a vector operand
taken for a matrix, a chain of depthwise convs over a chunk), and a refusal
that depended on the order of deferred decisions. Every test asserts: a
layer `inspect` calls ok widens exactly.
"""

from __future__ import annotations

import numpy as np
from helpers import H, inspected, make_model, rand, widen_exact

C = 3


def _conv(name, x, y, inits, rng, c_out, c_in, k=1, group=1):
    inits[f"{name}_w"] = rand(rng, c_out, c_in // group, k, k)
    inits[f"{name}_b"] = rand(rng, c_out)
    return H("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, pads=[k // 2] * 4, group=group)


def _ok_means_exact(model, layer, width):
    entry = inspected(model)[layer]["widen"]
    if entry["ok"]:
        widen_exact(model, {layer: width})


def split_two_of_three_coupled():
    """s = stem(x) cut by one Split into three equal chunks p | q | r; p + q + w(x)
    -> h1, r -> h2. Walking from w, p and q are reached from the Split's output
    side; both defer under the one key ("split", index), so only p's decision
    runs: s holds the units at p's offset, and q (which carries them) never
    grows. Before 47f8e8d: refused (two layouts of s)."""
    rng = np.random.default_rng(0)
    inits = {"sizes": np.array([C, C, C], np.int64)}
    nodes = [_conv("stem", "x", "s", inits, rng, 3 * C, 2),
             H("Split", ["s", "sizes"], ["p", "q", "r"], name="split", axis=1),
             _conv("w", "x", "wo", inits, rng, C, 2), H("Add", ["p", "q"], ["pq"]), H("Add", ["pq", "wo"], ["y0"]),
             _conv("h1", "y0", "y", inits, rng, 2, C), _conv("h2", "r", "z", inits, rng, 2, C)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], ["y", "z"], inits)


def split_two_of_three_to_concat():
    """EdgeNeXt-like cascade over two of three Split chunks; the third goes elsewhere."""
    rng = np.random.default_rng(0)
    inits = {"sizes": np.array([C, C, C], np.int64)}
    nodes = [_conv("stem", "x", "s", inits, rng, 3 * C, 2),
             H("Split", ["s", "sizes"], ["p", "q", "r"], name="split", axis=1),
             _conv("dw", "p", "pd", inits, rng, C, C, k=3, group=C), H("Add", ["pd", "q"], ["u"]),
             H("Concat", ["u", "q"], ["cat"], axis=1), _conv("head", "cat", "y", inits, rng, 2, 2 * C),
             _conv("h2", "r", "z", inits, rng, 2, C)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], ["y", "z"], inits)


def matrix_times_vector():
    """b = v @ W2 is rank 1 ([K], the units); o = relu(A) @ b contracts them
    (A [K, K] computed). The free-axis rule takes port 1 at 1 from the end
    for B's columns, but a rank-1 B has no columns: its one axis is contracted."""
    rng = np.random.default_rng(0)
    inits = {"w2": rand(rng, 4, C), "w3": rand(rng, C, 2)}
    nodes = [H("MatMul", ["v", "w2"], ["b"], name="b_proj"), H("Relu", ["A"], ["Ar"]),
             H("MatMul", ["Ar", "b"], ["o"]), H("MatMul", ["o", "w3"], ["y"], name="out_proj")]
    return make_model(nodes, [("v", [4]), ("A", [C, C])], ["y"], inits)


def test_split_with_two_of_three_outputs_coupled():
    _ok_means_exact(split_two_of_three_coupled(), "w", C + 2)


def test_split_with_two_of_three_outputs_in_a_cascade():
    _ok_means_exact(split_two_of_three_to_concat(), "dw", C + 2)


def test_a_rank_one_operand_has_no_free_axis():
    _ok_means_exact(matrix_times_vector(), "b_proj", C + 2)


def _slice(inits, source, out, start, end, name):
    inits[f"{name}_s"], inits[f"{name}_e"] = np.array([start], np.int64), np.array([end], np.int64)
    inits["axes"] = np.array([1], np.int64)
    return H("Slice", [source, f"{name}_s", f"{name}_e", "axes"], [out], name=name)


def settle_order():
    """s = stem(x) [2c]; a = s[:, :c], b = s[:, c:] and b2 = s[:, c:] (a second
    Slice of the same half). a * b pairs the halves; g = w(x) + relu(relu(a));
    concat(g, b2) -> head. From w, the Concat's settle is queued before the
    Slices' (g is reached before a): it runs first, sees one carrier, and
    puts the units at offset 0 of 'cat'; the Slices' settle then makes s hold
    the space twice, b2 gets the units, the Concat re-settles with two
    carriers and conflicts with its first answer. From stem the same space
    grows exactly: the refusal from w depends only on the order of the
    deferred decisions (not unsound; a spurious refusal)."""
    rng = np.random.default_rng(0)
    inits = {}
    nodes = [_conv("stem", "x", "s", inits, rng, 2 * C, 2), _slice(inits, "s", "a", 0, C, "s0"),
             _slice(inits, "s", "b", C, 2 * C, "s1"), _slice(inits, "s", "b2", C, 2 * C, "s2"),
             _conv("w", "x", "wo", inits, rng, C, 2), H("Relu", ["a"], ["a2"]), H("Relu", ["a2"], ["a3"]),
             H("Add", ["wo", "a3"], ["g"]), H("Mul", ["a", "b"], ["d"]), _conv("h", "d", "z", inits, rng, 2, C),
             H("Concat", ["g", "b2"], ["cat"], axis=1), _conv("head", "cat", "y", inits, rng, 2, 2 * C)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], ["y", "z"], inits)


def test_the_settle_order_does_not_refuse_a_growable_space():
    model = settle_order()
    layers = inspected(model)
    assert layers["stem"]["widen"]["ok"]
    widen_exact(model, {"stem": 2 * C + 4})
    assert layers["w"]["widen"]["ok"], layers["w"]["widen"]["reason"]
    widen_exact(model, {"w": C + 2})


def depthwise_chain_on_a_chunk():
    """s = stem(x) [2c] holds its space twice (concat(s[:, :c], s[:, :c]) + s);
    dw2(dw1(s[:, c:])). inspect gives dw2 the stem's group (groups_by_layer:
    dw1's own search falls back to the stem's space, and dw2 shares it), but
    widen's find_group(dw2) looks upstream only as far as the first weighted
    layer (dw1), whose own layouts all fail: widen refuses what inspect
    promised. (Found by a random chunk-graph fuzz, seed 304.)"""
    rng = np.random.default_rng(0)
    inits = {}
    nodes = [_conv("stem", "x", "s", inits, rng, 2 * C, 2), _slice(inits, "s", "ch0", 0, C, "s0"),
             _slice(inits, "s", "ch1", C, 2 * C, "s1"), _conv("dw1", "ch1", "t1", inits, rng, C, C, k=3, group=C),
             _conv("dw2", "t1", "t2", inits, rng, C, C, k=3, group=C),
             H("Concat", ["ch0", "ch0"], ["cat"], axis=1), H("Add", ["cat", "s"], ["cs"]),
             _conv("head", "cs", "y", inits, rng, 2, 2 * C), _conv("side", "t2", "z", inits, rng, 2, C)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], ["y", "z"], inits)


def test_inspect_and_widen_agree_on_a_depthwise_chain():
    model = depthwise_chain_on_a_chunk()
    for layer in ("dw1", "dw2"):
        _ok_means_exact(model, layer, C + 1)
