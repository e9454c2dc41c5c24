"""Sizes computed at run time (Shape -> Gather -> Concat -> Reshape, Resize
sizes from Shape(x)[0:2], Expand / Tile shapes, Slice bounds from an input's
shape): graphs written with onnx.helper the way exporters write them. Each
positive case is grown and compared in onnxruntime at a sequence length other
than the one shape inference saw; each negative case is refused with its reason."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_net2net.ir import GraphIR

from helpers import H, inspected_layer, make_model, rand, widen_exact

D, HEADS, HEAD = 8, 2, 4


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _dims(source, prefix, axes, nodes, inits):
    """Unsqueeze(Gather(Shape(source), axis)) for each axis: 1-element size vectors."""
    nodes.append(H("Shape", [source], [f"{prefix}_shape"]))
    names = []
    for axis in axes:
        inits[f"{prefix}_i{axis}"] = np.array(axis, np.int64)
        nodes += [H("Gather", [f"{prefix}_shape", f"{prefix}_i{axis}"], [f"{prefix}_d{axis}"], axis=0),
                  H("Unsqueeze", [f"{prefix}_d{axis}", "axes0"], [f"{prefix}_u{axis}"])]
        names.append(f"{prefix}_u{axis}")
    inits["axes0"] = _i64(0)
    return names


def nanogpt_attention(*, scale_from_shape: bool = False) -> onnx.ModelProto:
    """x -> inp (the residual stream s) -> qkv -> split -> view(B, T, h, D // h)
    with B, T, D read from s.shape -> causal attention -> view(B, T, D) with D
    read from s.shape -> out -> + s -> head. `scale_from_shape`: the logit scale
    1/sqrt(D) is computed at run time from s.shape (a size used as data)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], {}
    inits.update(w_in=rand(rng, 4, D), w_qkv=rand(rng, D, 3 * D), b_qkv=rand(rng, 3 * D), w_out=rand(rng, D, D),
                 w_head=rand(rng, D, 3), split=_i64(D, D, D), heads=_i64(HEADS), heads_scalar=np.array(HEADS),
                 scale=np.array(1 / np.sqrt(HEAD), np.float32), mask=np.triu(np.full((16, 16), -1e9, np.float32), 1))
    nodes.append(H("MatMul", ["x", "w_in"], ["s"], name="inp"))
    batch, seq, width = _dims("s", "s", (0, 1, 2), nodes, inits)
    nodes += [
        H("MatMul", ["s", "w_qkv"], ["qkv_mm"], name="qkv"),
        H("Add", ["qkv_mm", "b_qkv"], ["qkv_out"]),
        H("Split", ["qkv_out", "split"], ["q", "k", "v"], axis=2),
        H("Div", [width, "heads_scalar"], ["head_size"]),
        H("Concat", [batch, seq, "heads", "head_size"], ["view_shape"], axis=0),
    ]
    for name in "qkv":
        nodes += [H("Reshape", [name, "view_shape"], [f"{name}4"]),
                  H("Transpose", [f"{name}4"], [f"{name}h"], perm=[0, 2, 1, 3])]
    nodes += [H("Transpose", ["kh"], ["kT"], perm=[0, 1, 3, 2]), H("MatMul", ["qh", "kT"], ["scores"])]
    if scale_from_shape:
        nodes += [H("Cast", ["s_d2"], ["width_f"], to=onnx.TensorProto.FLOAT), H("Sqrt", ["width_f"], ["root"]),
                  H("Div", ["scores", "root"], ["scaled"])]
    else:
        nodes.append(H("Mul", ["scores", "scale"], ["scaled"]))
    inits.update(zero=_i64(0), axes23=_i64(0, 1))
    nodes += [
        H("Concat", [seq, seq], ["mask_end"], axis=0),
        H("Slice", ["mask", "zero2", "mask_end", "axes23"], ["causal"]),
        H("Add", ["scaled", "causal"], ["masked"]),
        H("Softmax", ["masked"], ["probs"], axis=-1),
        H("MatMul", ["probs", "vh"], ["context"]),
        H("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        H("Concat", [batch, seq, width], ["merge_shape"], axis=0),
        H("Reshape", ["context_t", "merge_shape"], ["merged"]),
        H("MatMul", ["merged", "w_out"], ["attn"], name="out"),
        H("Add", ["s", "attn"], ["resid"]),
        H("MatMul", ["resid", "w_head"], ["y"], name="head"),
    ]
    inits["zero2"] = _i64(0, 0)
    return make_model(nodes, [("x", ["B", "T", 4])], [("y", ["B", "T", 3])], inits)


def _feeds(model, seq: int = 5):
    return {"x": np.random.default_rng(1).standard_normal((2, seq, 4)).astype(np.float32)}


def test_heads_grow_and_the_merge_reading_the_stream_width_becomes_a_constant():
    model = nanogpt_attention()
    assert inspected_layer(model, "qkv")["widen"]["ok"]
    grown, report = widen_exact(model, {"qkv": 3 * 3 * HEAD}, feeds=_feeds(model))
    assert report["changes"][0]["size_inputs"], "the merge's width entry must be rewritten"
    widen_exact(model, {"qkv": 3 * 4 * HEAD}, feeds=_feeds(model, seq=7))


def test_stream_grows_and_the_head_size_read_from_it_is_frozen():
    model = nanogpt_attention()
    assert inspected_layer(model, "inp")["widen"]["ok"]
    for width in (12, 16):
        widen_exact(model, {"inp": width}, feeds=_feeds(model, seq=3))


def test_a_scale_computed_from_the_stream_width_is_frozen():
    """1/sqrt(D) with D read from s.shape (Swin's head_dim ** -0.5): the
    stream grows, the scale keeps its old value (a constant now)."""
    model = nanogpt_attention(scale_from_shape=True)
    grown, report = widen_exact(model, {"inp": 12}, feeds=_feeds(model))
    assert not any(n.op_type == "Sqrt" and n.input[0] == "width_f" for n in grown.graph.node)
    assert inspected_layer(model, "qkv")["widen"]["ok"]  # the heads do not change the stream's width
    widen_exact(model, {"qkv": 3 * 3 * HEAD}, feeds=_feeds(model))


def test_a_width_read_at_run_time_that_shapes_data_is_refused():
    """ConstantOfShape(Shape(s)[2:]): a tensor whose shape would keep the old width."""
    model = nanogpt_attention()
    nodes = list(model.graph.node)
    extra = [H("ConstantOfShape", ["s_u2"], ["zeros"], value=onnx.helper.make_tensor("v", 1, [1], [0.0])),
             H("ReduceSum", ["zeros"], ["zeros_sum"], keepdims=0), H("Add", ["y", "zeros_sum"], ["y2"])]
    graph = onnx.helper.make_graph(nodes + extra, "g", list(model.graph.input),
                                   [onnx.helper.make_tensor_value_info("y2", 1, ["B", "T", 3])],
                                   initializer=list(model.graph.initializer))
    patched = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    reason = inspected_layer(patched, "inp")["widen"]["reason"]
    assert reason.startswith("ConstantOfShape") and "as data" in reason


def _dense(out_shape_nodes, inits, *, inputs=(("x", ["N", 4]),), output="y"):
    """x -> fc1 (4 -> 6) -> h [N, 6] -> nodes ... -> t -> fc2 (6 -> 2) -> y."""
    rng = np.random.default_rng(2)
    inits.update(w1=rand(rng, 4, 6), w2=rand(rng, 6, 2), axes0=_i64(0))
    nodes = [H("MatMul", ["x", "w1"], ["h"], name="fc1")] + out_shape_nodes + [
        H("MatMul", ["t", "w2"], ["y"], name="fc2")]
    return make_model(nodes, list(inputs), [output], inits)


def _expand_model(width_from: str, minus_one_idiom: bool = False) -> onnx.ModelProto:
    """h [N, 6] -> Unsqueeze -> Expand to [N, 3, width] with width = Shape(width_from)[1].
    `minus_one_idiom`: the target passes through Where(Equal(t, -1), 1, t), as the
    TorchScript exporter writes `expand` (Hugging Face's repeat_kv)."""
    inits = {"one": _i64(1), "three": _i64(3), "i0": np.array(0), "i1": np.array(1), "minus": _i64(-1, -1, -1),
             "ones": _i64(1, 1, 1)}
    nodes = [H("Unsqueeze", ["h", "one"], ["u"]),
             H("Shape", ["h"], ["hs"]), H("Gather", ["hs", "i0"], ["n"]), H("Unsqueeze", ["n", "axes0"], ["n1"]),
             H("Shape", [width_from], ["ws"]), H("Gather", ["ws", "i1"], ["w"]),
             H("Unsqueeze", ["w", "axes0"], ["wdim"]),
             H("Concat", ["n1", "three", "wdim"], ["target"], axis=0)]
    if minus_one_idiom:
        nodes += [H("Equal", ["target", "minus"], ["is_minus"]), H("Where", ["is_minus", "ones", "target"], ["fixed"]),
                  H("Expand", ["u", "fixed"], ["t"])]
    else:
        nodes.append(H("Expand", ["u", "target"], ["t"]))
    inputs = [("x", ["N", 4])] + ([("ref", ["N", "K"])] if width_from == "ref" else [])
    return _dense(nodes, inits, inputs=inputs, output=("y", ["N", 3, 2]))


def test_expand_to_a_shape_read_from_its_own_input_grows():
    model = _expand_model("h")
    widen_exact(model, {"fc1": 9})


def test_expand_through_the_minus_one_idiom_grows():
    widen_exact(_expand_model("h", minus_one_idiom=True), {"fc1": 9})


def test_expand_to_a_width_read_from_an_unrelated_input_is_refused():
    reason = inspected_layer(_expand_model("ref"), "fc1")["widen"]["reason"]
    assert "Expand" in reason and "does not follow the units" in reason


def _tile_model(repeat_axis: int) -> onnx.ModelProto:
    """h [N, 6] -> Unsqueeze [N, 1, 6] -> Tile with repeats read from ref's shape at `repeat_axis`."""
    inits = {"one": _i64(1), "i1": np.array(1)}
    repeats = ["one", "one", "one"]
    repeats[repeat_axis] = "r1"
    nodes = [H("Unsqueeze", ["h", "one"], ["u"]), H("Shape", ["ref"], ["rs"]), H("Gather", ["rs", "i1"], ["r"]),
             H("Unsqueeze", ["r", "axes0"], ["r1"]), H("Concat", repeats, ["reps"], axis=0),
             H("Tile", ["u", "reps"], ["t"])]
    return _dense(nodes, inits, inputs=[("x", ["N", 4]), ("ref", ["N", "K"])], output=("y", ["N", None, 2]))


def test_tile_repeating_the_token_axis_at_run_time_grows():
    model = _tile_model(1)
    feeds = {"x": np.ones((2, 4), np.float32) * np.arange(4, dtype=np.float32), "ref": np.zeros((2, 3), np.float32)}
    widen_exact(model, {"fc1": 10}, feeds=feeds)


def test_tile_repeating_the_unit_axis_at_run_time_is_refused():
    reason = inspected_layer(_tile_model(2), "fc1")["widen"]["reason"]
    assert "Tile" in reason and "repeats the unit axis" in reason


def _position_model(slice_axis: int) -> onnx.ModelProto:
    """x [B, T, 4] -> inp -> + pos[:, :T] (ends read from x.shape) -> Relu -> fc2."""
    rng = np.random.default_rng(3)
    inits = {"w_in": rand(rng, 4, 6), "w2": rand(rng, 6, 2), "pos": rand(rng, 1, 16, 6), "zero": _i64(0),
             "i1": np.array(1), "axes0": _i64(0), "slice_axes": _i64(slice_axis)}
    nodes = [H("MatMul", ["x", "w_in"], ["h"], name="inp"), H("Shape", ["x"], ["xs"]),
             H("Gather", ["xs", "i1"], ["tokens"]), H("Unsqueeze", ["tokens", "axes0"], ["end"]),
             H("Slice", ["pos", "zero", "end", "slice_axes"], ["pos_t"]), H("Add", ["h", "pos_t"], ["hp"]),
             H("Relu", ["hp"], ["t"]), H("MatMul", ["t", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", ["B", "T", 4])], ["y"], inits, check=slice_axis == 1)


def test_learned_positions_sliced_to_the_sequence_length_grow():
    model = _position_model(1)
    widen_exact(model, {"inp": 9}, feeds=_feeds(model, seq=5))


def test_a_slice_of_the_unit_axis_with_bounds_read_at_run_time_is_refused(monkeypatch):
    """pos[:, :, :T]: a length read at run time on the unit axis is refused (the
    Add meets an operand whose length on the unit axis is unknown)."""
    # (onnxruntime's symbolic inference would take T = 16 from the Add's broadcast: this
    # model only runs at T = 1; leave T unknown, as it is in a model that runs at any T)
    monkeypatch.setattr(GraphIR, "_refine_with_symbolic_inference", lambda self, light: None)
    reason = inspected_layer(_position_model(2), "inp")["widen"]["reason"]
    assert "operand 'pos_t' has None positions on the unit axis" in reason


def _resize_model(sizes_from: str) -> onnx.ModelProto:
    """LR-ASPP's upsampling: Resize(r, sizes=Concat(Shape(sizes_from)[0:2], [16, 16]))."""
    rng = np.random.default_rng(4)
    inits = {"w1": rand(rng, 4, 3, 1, 1), "w2": rand(rng, 2, 4, 1, 1), "s0": _i64(0), "s2": _i64(2),
             "hw": _i64(16, 16)}
    nodes = [H("Conv", ["x", "w1"], ["c"], name="c1"), H("Relu", ["c"], ["r"]),
             H("Shape", [sizes_from], ["rs"]), H("Slice", ["rs", "s0", "s2"], ["nc"]),
             H("Concat", ["nc", "hw"], ["sizes"], axis=0),
             H("Resize", ["r", "", "", "sizes"], ["up"], mode="nearest"),
             H("Conv", ["up", "w2"], ["y"], name="c2")]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], ["y"], inits)


def test_resize_to_sizes_read_from_its_own_input_grows():
    model = _resize_model("r")
    widen_exact(model, {"c1": 7})


def test_resize_whose_sizes_change_the_unit_axis_is_refused():
    reason = inspected_layer(_resize_model("x"), "c1")["widen"]["reason"]
    # shape inference already sees 3 channels after the Resize; either way the layer is refused there
    assert "changes the unit axis (4 -> 3" in reason or "'up' does not have the layout" in reason


def test_widen_factor_twice_over_frozen_sizes_stays_exact():
    """The second group (the heads) reads the sizes the first (the stream)
    replaced by constants, and edits those constants like any literal."""
    model = nanogpt_attention()
    grown, report = widen_exact(model, factor=2, feeds=_feeds(model, seq=6))
    assert [change["new_width"] for change in report["changes"]] == [2 * D, 6 * D]
    assert report["changes"][0]["size_inputs"]


def test_a_target_shared_with_another_group_is_copied_for_the_grown_reshape():
    """The dynamo exporter computes one view target for several layers; only
    the grown group's Reshape may read the edited entries."""
    rng = np.random.default_rng(5)
    inits = {"i0": np.array(0), "axes0": _i64(0), "two": _i64(2), "three": _i64(3), "flat": _i64(0, -1)}
    nodes = [H("Shape", ["x"], ["xs"]), H("Gather", ["xs", "i0"], ["n"]), H("Unsqueeze", ["n", "axes0"], ["n1"]),
             H("Concat", ["n1", "two", "three"], ["heads_shape"], axis=0)]
    for a, b in (("1", "2"), ("3", "4")):
        inits.update({f"w{a}": rand(rng, 4, 6), f"w{b}": rand(rng, 6, 2)})
        nodes += [H("MatMul", ["x", f"w{a}"], [f"h{a}"], name=f"fc{a}"),
                  H("Reshape", [f"h{a}", "heads_shape"], [f"heads{a}"]), H("Relu", [f"heads{a}"], [f"r{a}"]),
                  H("Reshape", [f"r{a}", "flat"], [f"m{a}"]), H("MatMul", [f"m{a}", f"w{b}"], [f"y{a}"], name=f"fc{b}")]
    model = make_model(nodes, [("x", ["N", 4])], [("y1", ["N", 2]), ("y3", ["N", 2])], inits)
    grown, _ = widen_exact(model, {"fc1": 9})
    readers = {n.name or n.output[0]: n.input[1] for n in grown.graph.node if n.op_type == "Reshape"}
    targets = [n.input[1] for n in grown.graph.node if n.op_type == "Reshape" and n.input[0] in ("h1", "h3")]
    assert len(set(targets)) == 2 and "heads_shape" in targets, readers


def _window_pad_model(pad_channels: bool = False) -> onnx.ModelProto:
    """Swin's window padding as the TorchScript exporter writes F.pad(h, (0, 0, 0, pr, 0, pb)) on a
    channels-last map: torch-order pads with pr, pb = (4 - W % 4) % 4, (4 - H % 4) % 4 read at run
    time, zero-filled to 2 * rank, reshaped to [-1, 2], reversed, transposed, flattened, cast.
    `pad_channels`: pr pads the channel (unit) axis instead."""
    rng = np.random.default_rng(6)
    inits = {"w1": rand(rng, 3, 6), "w2": rand(rng, 6, 2), "four": np.array(4, np.int64), "i1": np.array(1),
             "i2": np.array(2), "zero1": _i64(0), "axes0": _i64(0), "eight": np.array(8, np.int64),
             "pairs": _i64(-1, 2), "flat": _i64(-1), "rev_start": _i64(-1), "rev_end": _i64(-(2 ** 63) + 1),
             "rev_step": _i64(-1)}
    nodes = [H("MatMul", ["x", "w1"], ["h"], name="fc1"), H("Shape", ["h"], ["hs"])]
    for name, axis in (("pr", "i2"), ("pb", "i1")):
        nodes += [H("Gather", ["hs", axis], [f"{name}_dim"], axis=0),
                  H("Mod", [f"{name}_dim", "four"], [f"{name}_m"]), H("Sub", ["four", f"{name}_m"], [f"{name}_s"]),
                  H("Mod", [f"{name}_s", "four"], [f"{name}_v"]), H("Unsqueeze", [f"{name}_v", "axes0"], [name])]
    torch_pads = ["zero1", "pr", "zero1", "zero1", "zero1", "pb"] if pad_channels else \
        ["zero1", "zero1", "zero1", "pr", "zero1", "pb"]
    nodes += [H("Concat", torch_pads, ["torch_pads"], axis=0), H("Shape", ["torch_pads"], ["tps"]),
              H("Gather", ["tps", "axes0"], ["tpn"], axis=0), H("Sub", ["eight", "tpn"], ["fill_n"]),
              H("ConstantOfShape", ["fill_n"], ["fill"], value=onnx.helper.make_tensor("v", 7, [1], [0])),
              H("Concat", ["torch_pads", "fill"], ["all_pads"], axis=0),
              H("Reshape", ["all_pads", "pairs"], ["pairs2"]),
              H("Slice", ["pairs2", "rev_start", "rev_end", "axes0", "rev_step"], ["reversed"]),
              H("Transpose", ["reversed"], ["onnx_order"], perm=[1, 0]), H("Reshape", ["onnx_order", "flat"], ["pads"]),
              H("Pad", ["h", "pads"], ["padded"]), H("Relu", ["padded"], ["t"]),
              H("MatMul", ["t", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", ["B", "H", "W", 3])], [("y", ["B", None, None, 2])], inits, check=False)


def test_window_padding_read_at_run_time_grows():
    model = _window_pad_model()
    feeds = {"x": np.random.default_rng(7).standard_normal((2, 5, 7, 3)).astype(np.float32)}
    widen_exact(model, {"fc1": 10}, feeds=feeds)


def test_padding_the_unit_axis_at_run_time_is_refused():
    reason = inspected_layer(_window_pad_model(pad_channels=True), "fc1")["widen"]["reason"]
    assert reason.startswith("Pad") and "pad the unit axis" in reason
