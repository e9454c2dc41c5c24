"""GraphIR: producers, consumers, constants, shapes, order, and the checks it makes."""

import logging

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_net2net import io
from onnx_net2net.errors import ModelLoadError
from onnx_net2net.ir import GraphIR, Use, constant_node_value, node_attr
from helpers import H, make_model, model_path, rand


def ir_of(model):
    return GraphIR(io.from_proto(model))


def small_model():
    rng = np.random.default_rng(0)
    inits = {"W": rand(rng, 3, 4), "b": rand(rng, 3), "W2": rand(rng, 2, 3)}
    nodes = [
        H("Constant", [], ["k"], name="const", value=numpy_helper.from_array(np.arange(3, dtype=np.float32))),
        H("Identity", ["W"], ["W_id"], name="id1"),
        H("Identity", ["W_id"], ["W_id2"], name="id2"),
        H("Gemm", ["x", "W_id2", "b"], ["h"], name="L1", transB=1),
        H("Add", ["h", "k"], ["hk"]),
        H("Relu", ["hk"], ["r"], name="relu"),
        H("Gemm", ["r", "W2"], ["y"], name="L2", transB=1),
        H("Constant", [], ["two"], name="c2", value_float=2.0),
        H("Constant", [], ["ints"], name="c3", value_ints=[1, 2, 3]),
        H("Mul", ["r", "two"], ["z"], name="mul"),
    ]
    return make_model(nodes, [("x", ["N", 4])], ["y", "z"], inits)


def test_producers_and_consumers():
    ir = ir_of(small_model())
    index = {n.name or n.op_type: i for i, n in enumerate(ir.nodes)}
    assert ir.producer["h"] == (index["L1"], 0)
    assert ir.producer_node("r") == index["relu"]
    assert ir.producer_node("x") is None and ir.producer_node("W") is None
    assert ir.uses("r") == [Use(index["L2"], 0), Use(index["mul"], 0)]
    assert ir.uses("W") == [Use(index["id1"], 0)]
    assert ir.uses("y") == []
    assert ir.graph_inputs == ["x"] and ir.graph_outputs == ["y", "z"]
    assert set(ir.dag.successors(index["relu"])) == {index["L2"], index["mul"]}
    assert ir.dag.edges[index["L1"], index["Add"]]["tensors"] == ["h"]
    assert ir.label(index["relu"]) == "'relu'"
    assert ir.label(index["Add"]) == f"Add#{index['Add']}"


def test_const_value_through_identity_and_constant_nodes():
    model = small_model()
    ir = ir_of(model)
    weight = numpy_helper.to_array([t for t in model.graph.initializer if t.name == "W"][0])
    assert ir.const_root("W_id2") == ("init", "W")
    np.testing.assert_array_equal(ir.const_value("W_id2"), weight)
    assert ir.const_root("k")[0] == "node"
    np.testing.assert_array_equal(ir.const_value("k"), [0, 1, 2])
    assert float(ir.const_value("two")) == 2.0
    np.testing.assert_array_equal(ir.const_value("ints"), [1, 2, 3])
    assert ir.is_const("b") and not ir.is_const("h") and not ir.is_const("x")
    assert ir.const_value("r") is None


def test_shapes():
    ir = ir_of(small_model())
    assert ir.shape("x") == (None, 4)
    assert ir.shape("h") == (None, 3)
    assert ir.shape("W") == (3, 4)
    assert ir.shape("y") == (None, 2)
    assert ir.rank("r") == 2
    assert ir.shape("nonexistent") is None


def test_shapes_of_shipped_cnn():
    ir = GraphIR(io.load(model_path("cnn")))
    assert ir.shape("/3/MaxPool_output_0") == (None, 8, 8, 8)
    assert ir.shape("/8/Flatten_output_0") == (None, 256)


def test_topological_order():
    model = small_model()
    ir = ir_of(model)
    order = ir.topological_order()
    assert sorted(order) == list(range(len(model.graph.node)))
    position = {index: k for k, index in enumerate(order)}
    for tensor, (producer, _) in ir.producer.items():
        for use in ir.uses(tensor):
            assert position[producer] < position[use.node]


def test_unsorted_nodes_are_a_load_error_not_a_crash():
    """ONNX requires topologically sorted nodes; an unsorted graph is refused cleanly."""
    model = small_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    with pytest.raises(ModelLoadError):
        ir_of(model)


def test_dangling_input_is_refused():
    nodes = [H("Relu", ["x"], ["r"]), H("Add", ["r", "ghost"], ["y"])]
    model = make_model(nodes, [("x", [2])], [("y", [2])], check=False)
    with pytest.raises(ModelLoadError, match="ghost"):
        ir_of(model)


def test_tensor_defined_twice_is_refused():
    nodes = [H("Relu", ["x"], ["r"]), H("Neg", ["x"], ["r"]), H("Abs", ["r"], ["y"])]
    model = make_model(nodes, [("x", [2])], [("y", [2])], check=False)
    with pytest.raises(ModelLoadError, match="defined twice"):
        ir_of(model)


def test_cycle_is_refused():
    nodes = [H("Add", ["x", "b"], ["a"], name="n1"), H("Relu", ["a"], ["b"], name="n2"), H("Abs", ["b"], ["y"])]
    model = make_model(nodes, [("x", [2])], [("y", [2])], check=False)
    with pytest.raises(ModelLoadError, match="cycle"):
        ir_of(model)


def test_undefined_graph_output_is_refused():
    model = make_model([H("Relu", ["x"], ["r"])], [("x", [2])], [("y", [2])], check=False)
    with pytest.raises(ModelLoadError, match="'y'"):
        ir_of(model)


def test_subgraph_reads_are_consumers():
    then_graph = helper.make_graph([H("Relu", ["r"], ["t"])], "then", [], [helper.make_tensor_value_info(
        "t", onnx.TensorProto.FLOAT, [2])])
    else_graph = helper.make_graph([H("Neg", ["r"], ["e"])], "else", [], [helper.make_tensor_value_info(
        "e", onnx.TensorProto.FLOAT, [2])])
    nodes = [H("Abs", ["x"], ["r"], name="abs"), H("If", ["cond"], ["y"], name="if",
                                                   then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [("x", [2]), ("cond", [], onnx.TensorProto.BOOL)], [("y", [2])])
    ir = ir_of(model)
    assert Use(1, -1) in ir.uses("r")
    assert ir.dag.has_edge(0, 1)


def test_unknown_domain_falls_back_to_non_strict_inference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # onnxruntime's symbolic shape inference may drop a file in the cwd
    nodes = [H("Relu", ["x"], ["r"], name="relu"), H("Mystery", ["r"], ["y"], domain="com.example")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], extra_opsets=[("com.example", 1)], check=False)
    ir = ir_of(model)
    assert ir.shape("r") == (2, 3)


def test_inconsistent_shapes_are_a_load_error():
    rng = np.random.default_rng(0)
    nodes = [H("Gemm", ["x", "W"], ["y"], transB=1)]
    model = make_model(nodes, [("x", [2, 4])], [("y", [2, 3])], {"W": rand(rng, 3, 5)}, check=False)
    with pytest.raises(ModelLoadError, match="shape"):
        ir_of(model)


def test_big_initializers_are_not_copied_for_shape_inference():
    """Shapes of weights above the inference threshold still come from their dims."""
    rng = np.random.default_rng(0)
    inits = {"W": rand(rng, 256, 128), "W2": rand(rng, 3, 256)}
    nodes = [H("Gemm", ["x", "W"], ["h"], transB=1), H("Gemm", ["h", "W2"], ["y"], transB=1)]
    ir = ir_of(make_model(nodes, [("x", ["N", 128])], ["y"], inits))
    assert ir.shape("h") == (None, 256) and ir.shape("y") == (None, 3)


def test_helpers():
    node = H("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], group=2)
    assert node_attr(node, "kernel_shape") == [3, 3] and node_attr(node, "group") == 2
    assert node_attr(node, "pads", "default") == "default"
    const = H("Constant", [], ["c"], value_floats=[1.0, 2.5])
    np.testing.assert_array_equal(constant_node_value(const), [1.0, 2.5])
    assert constant_node_value(H("Constant", [], ["c"], value_int=7)) == 7


def test_ir_does_not_modify_the_model():
    model = small_model()
    before = model.SerializeToString()
    ir_of(model)
    assert model.SerializeToString() == before


def test_shape_inference_writes_nothing_in_the_working_directory(tmp_path, monkeypatch):
    """Analysis must not leave files behind (onnxruntime's symbolic shape
    inference saves `sym_shape_infer_temp.onnx` in the cwd when it gives up)."""
    rng = np.random.default_rng(0)
    nodes = [H("Gemm", ["x", "W1"], ["t"], name="L1", transB=1),
             H("MyAct", ["t"], ["a"], name="custom", domain="com.example"),
             H("Gemm", ["a", "W2"], ["y"], name="L2", transB=1)]
    model = make_model(nodes, [("x", ["N", 4])], [("y", ["N", 2])], {"W1": rand(rng, 3, 4), "W2": rand(rng, 2, 3)},
                       extra_opsets=[("com.example", 1)], check=False)
    monkeypatch.chdir(tmp_path)
    ir_of(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_symbolic_inference_guesses_are_not_printed(caplog, tmp_path, monkeypatch):
    """onnxruntime's symbolic inference warns "Unable to determine if
    floor(N/2) <= M, treat as equal" on a Slice whose end is read at run time
    (Swin's window padding prints dozens): not the user's concern."""
    monkeypatch.chdir(tmp_path)
    inits = {"i1": np.array(1, np.int64), "two": np.array(2, np.int64), "axes0": np.array([0], np.int64),
             "zero": np.array([0], np.int64), "axis1": np.array([1], np.int64)}
    nodes = [H("Shape", ["x"], ["xs"]), H("Gather", ["xs", "i1"], ["n"], axis=0), H("Div", ["n", "two"], ["half"]),
             H("Unsqueeze", ["half", "axes0"], ["end"]), H("Slice", ["z", "zero", "end", "axis1"], ["y"])]
    model = make_model(nodes, [("x", ["B", "N"]), ("z", ["B", "M"])], [("y", ["B", None])], inits, check=False)
    caplog.set_level(logging.INFO)
    assert ir_of(model).shape("y") == (None, None)
    assert not [r for r in caplog.records if "Unable to determine" in r.getMessage()]
