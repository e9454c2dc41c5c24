"""What the passes skip or defer must answer exactly as if it had not been
skipped: a rewritten model's index infers shapes on the first question,
ranks and known dims answer without symbolic inference, and the changed
tensors of a rewrite are found in one pass when the graph is in order."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_net2net as n2n
from onnx_net2net import io, typeinfo
from onnx_net2net.errors import InternalError
from onnx_net2net.ir import GraphIR

from helpers import H, make_model, rand


def runtime_reshape_model():
    """x [N, 6, 4] -> Reshape to [N, 3, -1] (the batch read from Shape(x)):
    ONNX inference leaves the dims of `r` unknown, symbolic inference finds them."""
    rng = np.random.default_rng(0)
    nodes = [H("Shape", ["x"], ["s"]), H("Gather", ["s", "zero"], ["n"], axis=0),
             H("Unsqueeze", ["n", "axes"], ["n1"]), H("Concat", ["n1", "tail"], ["target"], axis=0),
             H("Reshape", ["x", "target"], ["r"]), H("Relu", ["r"], ["a"]),
             H("MatMul", ["a", "W"], ["y"], name="fc")]
    inits = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64),
             "tail": np.array([3, -1], np.int64), "W": rand(rng, 8, 5)}
    return make_model(nodes, [("x", ["N", 6, 4])], [("y", ["N", 3, 5])], inits)


def count_symbolic_runs(monkeypatch) -> list:
    runs = []
    original = GraphIR._refine_with_symbolic_inference

    def counted(self, light):
        runs.append(1)
        return original(self, light)

    monkeypatch.setattr(GraphIR, "_refine_with_symbolic_inference", counted)
    return runs


def test_rank_and_dim_answer_as_the_refined_shape(monkeypatch):
    model = runtime_reshape_model()
    names = [name for node in model.graph.node for name in node.output]
    refined = GraphIR(io.from_proto(model))
    expected = {name: refined.shape(name) for name in names}
    assert expected["a"] == (None, 3, 8), "symbolic inference must have filled the reshaped dims"
    runs = count_symbolic_runs(monkeypatch)
    ir = GraphIR(io.from_proto(model))
    assert {name: ir.rank(name) for name in names} == {n: len(s) for n, s in expected.items()}
    assert ir.dim("y", 2) == 5 and ir.dim("x", 1) == 6
    assert runs == [], "a rank, or a dim ONNX inference found, needs no symbolic inference"
    assert ir.dim("a", 2) == 8 and runs == [1]  # a dim only symbolic inference finds runs it (once)
    for name, shape in expected.items():
        assert [ir.dim(name, axis) for axis in range(len(shape))] == list(shape)


def channel_split_chain(blocks: int):
    """ShuffleNet's channel split, `blocks` times: x[:, C//2:] written as a
    Slice whose bounds are Shape -> Gather -> Div -> Mul (ONNX inference loses
    the channel dim there, and every dim after it), a 1x1 conv on that half,
    concatenated with the other half. The chain is longer than the refinement's
    recursion depth."""
    rng = np.random.default_rng(0)
    channels = 8
    nodes, inits = [], {"one": np.array(1, np.int64), "two": np.array(2, np.int64), "axes": np.array([0], np.int64),
                        "channel_axis": np.array([1], np.int64), "big": np.array([1 << 62], np.int64)}
    tensor = "x"
    for k in range(blocks):
        nodes += [H("Shape", [tensor], [f"s{k}"]), H("Gather", [f"s{k}", "one"], [f"c{k}"], axis=0),
                  H("Div", [f"c{k}", "two"], [f"h{k}"]), H("Unsqueeze", [f"h{k}", "axes"], [f"half{k}"]),
                  H("Slice", [tensor, "axes0", f"half{k}", "channel_axis"], [f"kept{k}"]),
                  H("Slice", [tensor, f"half{k}", "big", "channel_axis"], [f"split{k}"]),
                  H("Conv", [f"split{k}", f"w{k}"], [f"conv{k}"], name=f"conv{k}"),
                  H("Relu", [f"conv{k}"], [f"relu{k}"]),
                  H("Concat", [f"kept{k}", f"relu{k}"], [f"cat{k}"], axis=1)]
        inits[f"w{k}"] = rand(rng, channels // 2, channels // 2, 1, 1)
        tensor = f"cat{k}"
    inits["axes0"] = np.array([0], np.int64)
    nodes.append(H("Conv", [tensor, "w_out"], ["y"], name="head"))
    inits["w_out"] = rand(rng, 3, channels, 1, 1)
    return make_model(nodes, [("x", ["N", channels, 5, 5])], [("y", ["N", 3, 5, 5])], inits)


def test_slices_with_bounds_read_at_run_time_are_refined_without_symbolic_inference(monkeypatch):
    from onnx_net2net.analysis.refined_shapes import MAX_DEPTH, refined_shape

    blocks = MAX_DEPTH // 3 + 4  # past the recursion depth from the last block's tensors
    model = channel_split_chain(blocks)
    names = [name for node in model.graph.node for name in node.output if node.op_type in ("Slice", "Conv", "Concat")]
    symbolic = GraphIR(io.from_proto(model))
    expected = {name: symbolic.shape(name) for name in names}
    assert expected[f"split{blocks - 1}"] == (None, 4, 5, 5), "symbolic inference must have found the dims"
    runs = count_symbolic_runs(monkeypatch)
    ir = GraphIR(io.from_proto(model))
    assert ir.inferred_shape(f"split{blocks - 1}")[1] is None, "ONNX inference must have lost the channel dim"
    assert refined_shape(ir, f"cat{blocks - 1}") == (None, 8, 5, 5)  # asked first: the far end of the chain
    assert {name: refined_shape(ir, name) for name in names} == expected
    assert runs == []
    growable = [layer["name"] for layer in n2n.inspect(model, trial=False)["layers"] if layer["widen"]["ok"]]
    assert growable == [f"conv{k}" for k in range(blocks)] and runs == []  # the head writes the graph output


def test_a_rewritten_models_index_infers_the_model_as_it_was_when_built():
    """Inference is deferred to the first question, but answers for the model
    the index was built on, not for later edits."""
    model = runtime_reshape_model()
    handle = io.from_proto(model)
    eager = {name: GraphIR(handle).shape(name) for node in model.graph.node for name in node.output}
    handle.rewritten = True
    ir = GraphIR(handle)
    matmul = next(n for n in handle.graph.node if n.op_type == "MatMul")
    weight = next(t for t in handle.graph.initializer if t.name == "W")
    weight.CopyFrom(onnx.numpy_helper.from_array(np.zeros((8, 7), np.float32), "W"))  # edits after the build
    handle.graph.output[0].type.tensor_type.ClearField("shape")
    assert matmul.input[1] == "W"
    assert {name: ir.shape(name) for name in eager} == eager
    assert GraphIR(handle).shape("y") == (None, 3, 7)


def rewrite(handle, edit):
    with typeinfo.kept_consistent(handle):
        edit(handle.graph)


def declared(graph, name):
    value = next(v for v in graph.value_info if v.name == name)
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def mlp_with_declarations(width: int = 3):
    rng = np.random.default_rng(1)
    nodes = [H("Gemm", ["x", "W1"], ["h"], transB=1, name="fc1"), H("Relu", ["h"], ["r"]),
             H("Gemm", ["r", "W2"], ["y"], transB=1, name="fc2")]
    model = make_model(nodes, [("x", [2, 4])], [("y", [2, 2])], {"W1": rand(rng, width, 4), "W2": rand(rng, 2, width)})
    model.graph.value_info.extend([helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [2, width]),
                                   helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, width])])
    return model


def widen_hidden(graph, width: int = 5):
    rng = np.random.default_rng(2)
    for name, value in (("W1", rand(rng, width, 4)), ("W2", rand(rng, 2, width))):
        next(t for t in graph.initializer if t.name == name).CopyFrom(onnx.numpy_helper.from_array(value, name))


def test_declarations_follow_a_rewrite():
    handle = io.from_proto(mlp_with_declarations())
    rewrite(handle, widen_hidden)
    assert declared(handle.graph, "h") == [2, 5] and declared(handle.graph, "r") == [2, 5]


def test_a_rewrite_out_of_order_is_sorted_then_refused_by_inference():
    """Not in order: the index sorts the nodes to find the changed tensors,
    and ONNX inference (which needs the order) refuses the model."""
    handle = io.from_proto(mlp_with_declarations())

    def edit(graph):
        widen_hidden(graph)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend([nodes[0], nodes[2], nodes[1]])  # the Relu moved last

    with pytest.raises(InternalError, match="shapes are inconsistent"):
        rewrite(handle, edit)


def test_a_malformed_rewrite_is_an_internal_error():
    handle = io.from_proto(mlp_with_declarations())

    def dangle(graph):
        widen_hidden(graph)
        graph.node[2].input[0] = "nowhere"

    with pytest.raises(InternalError, match="malformed.*nowhere"):
        rewrite(handle, dangle)
