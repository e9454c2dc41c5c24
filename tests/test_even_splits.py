"""A Split into `num_outputs` equal parts (opset 18, the dynamo exporter's
`torch.chunk`) whose outputs grow unequally is given explicit sizes.

`Split(x, num_outputs=k)` cuts x into k equal parts; when the units of one
layer sit in some of the parts only, or the parts hold spaces that grow by
different amounts, equal parts would cut the grown tensor in the wrong
places. The rewrite removes `num_outputs` and adds the grown sizes as the
Split's second input (the two exclude each other), which is exact and valid
at every opset >= 13. Res2Net and CSPNet chunk their convolutions' outputs
this way.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import H, attr, inspected, make_model, node, rand, widen_exact


def _conv(name, x, y, inits, rng, c_out, c_in, k=1):
    inits[f"{name}_w"] = rand(rng, c_out, c_in, k, k)
    inits[f"{name}_b"] = rand(rng, c_out)
    return H("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, pads=[k // 2] * 4)


def two_producers_one_chunked_tensor():
    """a, b (4 channels each) -> concat -> Split(num_outputs=2) -> each half
    through its own conv -> concat -> head: a's units are in half 0 only."""
    rng, inits = np.random.default_rng(0), {}
    nodes = [_conv("a", "x", "a_out", inits, rng, 4, 2), _conv("b", "x", "b_out", inits, rng, 4, 2),
             H("Concat", ["a_out", "b_out"], ["cat"], axis=1), H("Relu", ["cat"], ["r"]),
             H("Split", ["r"], ["h0", "h1"], name="chunk", axis=1, num_outputs=2),
             _conv("c0", "h0", "c0_out", inits, rng, 3, 4, k=3), _conv("c1", "h1", "c1_out", inits, rng, 3, 4, k=3),
             H("Concat", ["c0_out", "c1_out"], ["mix"], axis=1), H("Relu", ["mix"], ["m"]),
             _conv("head", "m", "y", inits, rng, 2, 6)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 2, 5, 5])], inits, opset=18)


def res2net_chunks(scale: int = 4, width: int = 3):
    """Res2Net's hierarchical block: conv1's output chunked into `scale`
    parts; part i (+ the previous part's output) through a 3x3 conv; the last
    part passes through; concat; conv3."""
    rng, inits = np.random.default_rng(1), {}
    parts = [f"p{i}" for i in range(scale)]
    nodes = [_conv("conv1", "x", "c1", inits, rng, width * scale, 2), H("Relu", ["c1"], ["r1"]),
             H("Split", ["r1"], parts, name="chunk", axis=1, num_outputs=scale)]
    outs = []
    for i in range(scale - 1):
        source = parts[i]
        if i:
            nodes.append(H("Add", [outs[-1], parts[i]], [f"sum{i}"]))
            source = f"sum{i}"
        nodes += [_conv(f"conv2_{i}", source, f"o{i}_pre", inits, rng, width, width, k=3),
                  H("Relu", [f"o{i}_pre"], [f"o{i}"])]
        outs.append(f"o{i}")
    nodes += [H("Concat", outs + [parts[-1]], ["cat"], axis=1), _conv("conv3", "cat", "y", inits, rng, 2, width * scale)]
    return make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 2, 5, 5])], inits, opset=18)


def _assert_valid_with_sizes(model, split_sizes):
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    chunk = node(model, "chunk")
    assert attr(chunk, "num_outputs") is None
    sizes = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}[chunk.input[1]]
    assert sizes.tolist() == split_sizes


@pytest.mark.parametrize("layer, sizes", [("a", [6, 4]), ("b", [4, 6])])
def test_one_half_grows_and_the_split_gets_explicit_sizes(layer, sizes):
    model = two_producers_one_chunked_tensor()
    assert inspected(model)[layer]["widen"]["ok"], inspected(model)[layer]["widen"]
    wider, _ = widen_exact(model, {layer: 6})
    _assert_valid_with_sizes(wider, sizes)
    assert inspected(wider)[layer]["width"] == 6


def test_both_halves_grow_by_different_amounts_in_one_call():
    model = two_producers_one_chunked_tensor()
    wider, _ = widen_exact(model, {"a": 6, "b": 5})
    _assert_valid_with_sizes(wider, [6, 5])
    widths = inspected(wider)
    assert (widths["a"]["width"], widths["b"]["width"]) == (6, 5)


def test_halves_grown_one_after_the_other_keep_explicit_sizes():
    """The first group's rewrite gives the Split sizes; the second grows them."""
    wider, _ = widen_exact(two_producers_one_chunked_tensor(), {"a": 6, "b": 6})
    _assert_valid_with_sizes(wider, [6, 6])


def test_res2net_chunks_grow_and_stay_valid():
    model = res2net_chunks()
    report = inspected(model)
    growable = [name for name in ("conv1", "conv2_0", "conv2_1", "conv2_2") if report[name]["widen"]["ok"]]
    assert growable == ["conv1", "conv2_0", "conv2_1", "conv2_2"], report
    wider, _ = widen_exact(model, factor=1.5)
    onnx.checker.check_model(wider, full_check=True)
    onnx.shape_inference.infer_shapes(wider, check_type=True, strict_mode=True, data_prop=True)
    assert inspected(wider)["conv1"]["width"] > 12


def _even_split_without_num_outputs(opset: int, empty_sizes: bool = False) -> onnx.ModelProto:
    """The two-producer model at `opset`, its Split even by its output count
    alone (no `num_outputs`), with an empty sizes input if asked."""
    model = two_producers_one_chunked_tensor()
    model.opset_import[0].version = opset
    chunk = node(model, "chunk")
    kept = [a for a in chunk.attribute if a.name != "num_outputs"]
    del chunk.attribute[:]
    chunk.attribute.extend(kept)
    if empty_sizes:
        chunk.input.append("")
    onnx.checker.check_model(model, full_check=True)
    return model


def test_an_even_split_before_opset_13_is_not_given_sizes():
    """Split-11 takes no sizes input: the group of a, whose units are in one
    half only, is refused there (the rewrite wrote a Split-11 with a sizes
    input, an invalid model); a and b then grow together as a routing region."""
    model = _even_split_without_num_outputs(opset=12)
    assert inspected(model)["a"]["widen"]["ok"]
    wider, _ = widen_exact(model, {"a": 5})
    onnx.checker.check_model(wider, full_check=True)
    assert len(node(wider, "chunk").input) == 1


def test_an_even_split_with_an_empty_sizes_input_gets_its_sizes_there():
    """Split-13(x, "") splits evenly: the sizes replace the empty name (they
    were appended as a third input, which Split does not have)."""
    model = _even_split_without_num_outputs(opset=13, empty_sizes=True)
    assert inspected(model)["a"]["widen"]["ok"]
    wider, _ = widen_exact(model, {"a": 6})
    _assert_valid_with_sizes(wider, [6, 4])
    assert len(node(wider, "chunk").input) == 2
