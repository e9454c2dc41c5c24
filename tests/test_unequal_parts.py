"""A space in one part of a layer's output, the other parts holding other data.

FasterNet's partial convolution splits the stream [C/4 | 3C/4] and convolves
the first part only; RexNet adds the shortcut to the first channels of a
wider output (`out[:, :C] += x`); InceptionNeXt splits the stream into an
identity part and three depthwise branches of unequal sizes. Seeded whole,
the layer's units span the parts and are refused; the search then tries each
part alone (a `Parts` layout of one start): the units at that part's offset,
the other features fixed (`UnitGroup.fixed_features`). Each case is grown,
compared in onnxruntime, checked with the full checker and inspected again.
"""

from __future__ import annotations

import numpy as np
import onnx
from helpers import H, inspected, make_model, node_weight, rand, widen_exact


def _conv(name, x, y, inits, rng, c_out, c_in, k=1, group=1):
    inits[f"{name}_w"] = rand(rng, c_out, c_in // group, k, k)
    inits[f"{name}_b"] = rand(rng, c_out)
    return H("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, pads=[k // 2] * 4, group=group)


def partial_conv_block(c: int = 8, part: int = 2) -> onnx.ModelProto:
    """stem -> s; Split(s, [part, c - part]) -> 3x3 conv on the first part ->
    concat -> mix 1x1 (c -> 2c) -> relu -> proj (2c -> c) -> + s -> head."""
    rng, inits = np.random.default_rng(0), {"sizes": np.array([part, c - part], np.int64)}
    nodes = [_conv("stem", "x", "s", inits, rng, c, 2, k=3),
             H("Split", ["s", "sizes"], ["p0", "p1"], axis=1),
             _conv("partial", "p0", "q0", inits, rng, part, part, k=3), H("Concat", ["q0", "p1"], ["cat"], axis=1),
             _conv("mix", "cat", "m", inits, rng, 2 * c, c), H("Relu", ["m"], ["mr"]),
             _conv("proj", "mr", "pr", inits, rng, c, 2 * c), H("Add", ["s", "pr"], ["t"]),
             _conv("head", "t", "y", inits, rng, 3, c)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 3, 5, 5])], inits)


def partial_residual(c: int = 6, out: int = 9) -> onnx.ModelProto:
    """a -> x (c); b: x -> out channels; y = concat(out[:, :c] + x, out[:, c:]) -> head."""
    rng = np.random.default_rng(1)
    inits = {"zero": np.array([0], np.int64), "c": np.array([c], np.int64), "end": np.array([out], np.int64),
             "axis": np.array([1], np.int64)}
    nodes = [_conv("a", "x", "xa", inits, rng, c, 2), H("Relu", ["xa"], ["xr"]),
             _conv("b", "xr", "o", inits, rng, out, c, k=3),
             H("Slice", ["o", "zero", "c", "axis"], ["o_first"]), H("Slice", ["o", "c", "end", "axis"], ["o_rest"]),
             H("Add", ["o_first", "xr"], ["shortcut"]), H("Concat", ["shortcut", "o_rest"], ["cat"], axis=1),
             _conv("head", "cat", "y", inits, rng, 3, out)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 3, 5, 5])], inits)


def inception_mixer(c: int = 10, band: int = 2) -> onnx.ModelProto:
    """stem -> s; Split(s, [c - 3 band, band, band, band]): identity and three
    depthwise convs -> concat -> layer scale -> mix -> + s -> head."""
    rng = np.random.default_rng(2)
    identity = c - 3 * band
    inits = {"sizes": np.array([identity, band, band, band], np.int64),
             "gamma": rand(rng, c, 1, 1)}
    nodes = [_conv("stem", "x", "s", inits, rng, c, 2, k=3),
             H("Split", ["s", "sizes"], ["i", "b0", "b1", "b2"], axis=1)]
    outs = ["i"]
    for k, name in enumerate(("b0", "b1", "b2")):
        nodes.append(_conv(f"dw{k}", name, f"{name}_out", inits, rng, band, band, k=2 * k + 1, group=band))
        outs.append(f"{name}_out")
    nodes += [H("Concat", outs, ["cat"], axis=1), H("Mul", ["cat", "gamma"], ["scaled"]),
              _conv("mix", "scaled", "m", inits, rng, c, c), H("Add", ["s", "m"], ["t"]),
              _conv("head", "t", "y", inits, rng, 3, c)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 3, 5, 5])], inits)


def _grows(model, layer, width):
    report = inspected(model)[layer]["widen"]
    assert report["ok"], report
    wider, _ = widen_exact(model, {layer: width})
    onnx.checker.check_model(wider, full_check=True)
    onnx.shape_inference.infer_shapes(wider, check_type=True, strict_mode=True)
    assert inspected(wider)[layer]["width"] == width
    return wider


def test_the_stream_of_a_partial_convolution_grows_in_one_part():
    wider = _grows(partial_conv_block(), "stem", 11)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in wider.graph.initializer}
    assert weights["partial_w"].shape[:2] == (2, 2)  # the larger part grew (6 -> 9), the convolved one did not
    assert weights["sizes"].tolist() == [2, 9]


def test_the_part_a_partial_residual_adds_to_grows_with_the_shortcut():
    model = partial_residual()
    wider = _grows(model, "b", 12)
    widths = inspected(wider)
    assert (widths["a"]["width"], widths["b"]["width"]) == (9, 12)  # the shortcut's space grew, b's rest did not


def test_an_inception_mixer_grows_its_identity_part():
    _grows(inception_mixer(), "stem", 14)


def test_every_layer_of_the_three_models_is_growable():
    for model in (partial_conv_block(), partial_residual(), inception_mixer()):
        refused = {name: layer["widen"]["reason"] for name, layer in inspected(model).items()
                   if not layer["widen"]["ok"] and name != "head"}
        assert not refused, refused


def mixconv(split_sizes=(3, 5)) -> onnx.ModelProto:
    """MixNet: grouped pointwise convs pw0, pw1 (4 channels each) concatenated,
    split again into kernel groups of `split_sizes` (depthwise 3x3 and 5x5),
    concatenated, then a grouped projection (split 4 | 4) -> head."""
    rng = np.random.default_rng(3)
    inits = {"groups": np.array(split_sizes, np.int64), "halves": np.array([4, 4], np.int64)}
    nodes = [_conv("pw0", "x", "a0", inits, rng, 4, 2), _conv("pw1", "x", "a1", inits, rng, 4, 2),
             H("Concat", ["a0", "a1"], ["a"], axis=1), H("Relu", ["a"], ["ar"]),
             H("Split", ["ar", "groups"], ["g0", "g1"], axis=1),
             _conv("dw0", "g0", "d0", inits, rng, split_sizes[0], split_sizes[0], k=3, group=split_sizes[0]),
             _conv("dw1", "g1", "d1", inits, rng, split_sizes[1], split_sizes[1], k=5, group=split_sizes[1]),
             H("Concat", ["d0", "d1"], ["d"], axis=1), H("Split", ["d", "halves"], ["h0", "h1"], axis=1),
             _conv("pwl0", "h0", "p0", inits, rng, 3, 4), _conv("pwl1", "h1", "p1", inits, rng, 3, 4),
             H("Concat", ["p0", "p1"], ["p"], axis=1), _conv("head", "p", "y", inits, rng, 2, 6)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 2, 5, 5])], inits)


def test_kernel_groups_that_cut_a_grouped_pointwise_conv_grow_piece_by_piece():
    """pw0's 4 channels are cut 3 | 1 by the kernel groups: its first 3 grow
    (the piece in one group); dw1's 5 channels span pw0 and pw1: its first
    one (from pw0) or the rest grows, never across the cut."""
    model = mixconv()
    refused = {name: layer["widen"]["reason"] for name, layer in inspected(model).items()
               if not layer["widen"]["ok"] and name != "head"}
    assert not refused, refused
    wider = _grows(model, "pw0", 6)
    assert node_weight(wider, "dw0").shape[0] == 5 and node_weight(wider, "dw1").shape[0] == 5
    wider = _grows(model, "dw1", 7)
    assert node_weight(wider, "pw0").shape[0] + node_weight(wider, "pw1").shape[0] == 10


def gated_block(g: int = 6, i: int = 4, c: int = 2) -> onnx.ModelProto:
    """MambaOut's gated CNN block (channels last): fc1 -> [g | i | c];
    c through a depthwise conv; fc2(gelu(g) * cat(i, conv(c))) + x."""
    rng = np.random.default_rng(4)
    d = 3
    inits = {"stem_w": rand(rng, 2, d), "fc1_w": rand(rng, d, g + i + c), "fc1_b": rand(rng, g + i + c),
             "sizes": np.array([g, i, c], np.int64), "dw_w": rand(rng, c, 1, 3, 3), "fc2_w": rand(rng, g, d),
             "head_w": rand(rng, d, 2)}
    nodes = [H("MatMul", ["x", "stem_w"], ["s"], name="stem"),
             H("MatMul", ["s", "fc1_w"], ["f"], name="fc1"), H("Add", ["f", "fc1_b"], ["fb"]),
             H("Split", ["fb", "sizes"], ["pg", "pi", "pc"], axis=3),
             H("Transpose", ["pc"], ["pcT"], perm=[0, 3, 1, 2]),
             H("Conv", ["pcT", "dw_w"], ["dc"], name="dw", group=c, pads=[1, 1, 1, 1]),
             H("Transpose", ["dc"], ["dcT"], perm=[0, 2, 3, 1]), H("Concat", ["pi", "dcT"], ["ic"], axis=3),
             H("Sigmoid", ["pg"], ["gate"]), H("Mul", ["gate", "ic"], ["gated"]),
             H("MatMul", ["gated", "fc2_w"], ["out"], name="fc2"), H("Add", ["s", "out"], ["t"]),
             H("MatMul", ["t", "head_w"], ["y"], name="head")]
    return make_model(nodes, [("x", ["N", 4, 4, 2])], [("y", ["N", 4, 4, 2])], inits)


def test_a_gated_block_grows_the_gate_with_the_part_it_gates():
    """g's head pairs with i, its tail with c: fc1 holds two spaces, each at
    two offsets ([g1 g2 | i | c], g1 ~ i, g2 ~ c); the first found grows, and
    the depthwise conv over c grows the other (its writer's second layout)."""
    model = gated_block()
    refused = {name: layer["widen"]["reason"] for name, layer in inspected(model).items()
               if not layer["widen"]["ok"] and name != "head"}
    assert not refused, refused
    wider = _grows(model, "fc1", 16)  # i's space: 4 -> 6 units, at two offsets (the 4 others kept)
    assert [int(v) for v in next(onnx.numpy_helper.to_array(t) for t in wider.graph.initializer
                                 if t.name == "sizes")] == [8, 6, 2]
    wider = _grows(model, "dw", 4)  # c's space: 2 -> 4, with g's tail
    assert node_weight(wider, "fc1").shape[1] == 16


def repeats_sliced(cut: int = 7) -> onnx.ModelProto:
    """a (3) -> cat = [a | b | relu(a)] (3 + 2 + 3): a's units at offsets 0
    and 5; Slices [0, cut) and [cut, 8) -> two heads; with cut 5 each repeat
    lies in one slice, with cut 7 the slice [0, 7) ends inside a repeat."""
    rng = np.random.default_rng(5)
    inits = {"zero": np.array([0], np.int64), "cut": np.array([cut], np.int64), "end": np.array([8], np.int64),
             "from_end": np.array([-3], np.int64), "axis": np.array([1], np.int64)}
    nodes = [_conv("a", "x", "ya", inits, rng, 3, 2), _conv("b", "x", "yb", inits, rng, 2, 2),
             H("Relu", ["ya"], ["ra"]), H("Concat", ["ya", "yb", "ra"], ["cat"], axis=1),
             H("Slice", ["cat", "zero", "cut", "axis"], ["first"]), H("Slice", ["cat", "cut", "end", "axis"], ["rest"]),
             H("Slice", ["cat", "from_end", "end", "axis"], ["tail"]),
             _conv("h1", "first", "y1", inits, rng, 2, cut), _conv("h2", "rest", "y2", inits, rng, 2, 8 - cut),
             _conv("h3", "tail", "y3", inits, rng, 2, 3), H("Add", ["y1", "y2"], ["y12"]), H("Add", ["y12", "y3"], ["y"])]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 2, 5, 5])], inits)


def test_slices_of_repeats_at_uneven_offsets_move_their_bounds():
    """Cut at 5: [0, 5) holds the first repeat, [5, 8) the second; a bound
    moves by the units of the repeats before it (counted from the end: after it)."""
    wider = _grows(repeats_sliced(cut=5), "a", 5)
    bounds = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in wider.graph.initializer}
    assert bounds["cut"] == [7] and bounds["end"] == [12] and bounds["from_end"] == [-5]


def test_a_slice_ending_inside_a_repeat_is_refused():
    widen = inspected(repeats_sliced(cut=7))["a"]["widen"]
    assert not widen["ok"] and "which cut a repeat of the units" in widen["reason"]


def mixconv_squeeze_excite() -> onnx.ModelProto:
    """MixNet's squeeze-excite: kernel groups k0 (3), k1 (5) concatenated ->
    d; gate = sigmoid(expand(relu(reduce(pool(d))))) (8); d * gate split in
    halves 4 | 4 by the grouped projection. The gate's units are cut at 4 by
    the halves and at 3 by the kernel groups: a part of a part grows."""
    rng = np.random.default_rng(6)
    inits = {"halves": np.array([4, 4], np.int64)}
    nodes = [_conv("k0", "x", "a0", inits, rng, 3, 2, k=3), _conv("k1", "x", "a1", inits, rng, 5, 2, k=5),
             H("Concat", ["a0", "a1"], ["d"], axis=1), H("GlobalAveragePool", ["d"], ["pooled"]),
             _conv("reduce", "pooled", "r", inits, rng, 2, 8), H("Relu", ["r"], ["rr"]),
             _conv("expand", "rr", "e", inits, rng, 8, 2), H("Sigmoid", ["e"], ["gate"]),
             H("Mul", ["d", "gate"], ["gated"]), H("Split", ["gated", "halves"], ["g0", "g1"], axis=1),
             _conv("pwl0", "g0", "p0", inits, rng, 2, 4), _conv("pwl1", "g1", "p1", inits, rng, 2, 4),
             H("Add", ["p0", "p1"], ["y"])]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 2, 5, 5])], inits)


def test_a_gate_cut_twice_grows_a_part_of_a_part():
    model = mixconv_squeeze_excite()
    wider = _grows(model, "expand", 11)  # the piece [0, 3) (k0's channels, in the first half) grows 3 -> 6
    assert node_weight(wider, "k0").shape[0] == 6 and node_weight(wider, "pwl0").shape[1] == 7


def test_a_shortcut_added_to_the_last_part_grows_with_it():
    """RexNet's partial residual the other way round (`out[:, 3:] += x`): the
    first slice, [0, 3) of 9, is one of three equal parts, which repeats of
    the units would fill; that fails, and the parts layouts are tried next."""
    rng = np.random.default_rng(7)
    inits = {"zero": np.array([0], np.int64), "three": np.array([3], np.int64), "end": np.array([9], np.int64),
             "axis": np.array([1], np.int64)}
    nodes = [_conv("a", "x", "xa", inits, rng, 6, 2), H("Relu", ["xa"], ["xr"]),
             _conv("b", "xr", "o", inits, rng, 9, 6, k=3),
             H("Slice", ["o", "zero", "three", "axis"], ["o_head"]), H("Slice", ["o", "three", "end", "axis"], ["o_tail"]),
             H("Add", ["o_tail", "xr"], ["shortcut"]), H("Concat", ["o_head", "shortcut"], ["cat"], axis=1),
             _conv("head", "cat", "y", inits, rng, 3, 9)]
    model = make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 3, 5, 5])], inits)
    wider = _grows(model, "b", 12)
    assert node_weight(wider, "a").shape[0] == 9
