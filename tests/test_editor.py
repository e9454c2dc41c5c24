"""GraphEditor: the one place a rewrite changes a graph. Each edit is made on a
small graph and the result is checked by running it in onnxruntime."""

import numpy as np
import pytest
import onnx
from onnx import helper

from onnx_net2net import io
from onnx_net2net.editor import GraphEditor, orphans_removed
from onnx_net2net.ir import GraphIR
from helpers import H, make_model, rand, run

X = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)


def chain():
    """x -> Gemm(W) -> Relu -> Gemm(W) (one weight read twice) -> y."""
    rng = np.random.default_rng(0)
    nodes = [H("Gemm", ["x", "W"], ["h"], name="L1", transB=1), H("Relu", ["h"], ["r"], name="relu"),
             H("Gemm", ["r", "W"], ["y"], name="L2", transB=1)]
    return make_model(nodes, [("x", [2, 4])], ["y"], {"W": rand(rng, 4, 4)})


def edited(model, edits):
    handle = io.from_proto(model)
    ir = GraphIR(handle)
    with orphans_removed(handle), GraphEditor(ir) as edit:
        edits(edit, ir)
    onnx.checker.check_model(handle.proto, full_check=True)
    return handle.proto


def index_of(ir, name):
    return next(i for i, node in enumerate(ir.nodes) if node.name == name)


def test_insertions_keep_topological_order_whatever_their_number():
    def edits(edit, ir):
        relu = index_of(ir, "relu")
        edit.insert_before(relu, [H("Neg", ["h"], ["h_neg"], name="neg")])
        edit.insert_before(relu, [H("Neg", ["h_neg"], ["h_back"], name="back")])
        edit.set_input(relu, 0, "h_back")
        edit.append([H("Identity", ["y"], ["y_copy"], name="copy")])

    model = edited(chain(), edits)
    assert [n.name for n in model.graph.node] == ["L1", "neg", "back", "relu", "L2", "copy"]
    np.testing.assert_allclose(run(model, {"x": X})[0], run(chain(), {"x": X})[0], rtol=1e-6)


def test_store_constants_writes_in_place_only_when_every_reader_agrees():
    original = chain()
    weight = onnx.numpy_helper.to_array(original.graph.initializer[0])

    def differing(edit, ir):
        written = edit.store_constants({(index_of(ir, "L2"), 1): 2 * weight})
        assert written == ["W/widened"]

    model = edited(chain(), differing)
    assert sorted(t.name for t in model.graph.initializer) == ["W", "W/widened"]
    h = np.maximum(X @ weight.T, 0)
    np.testing.assert_allclose(run(model, {"x": X})[0], h @ (2 * weight).T, rtol=1e-5)

    def agreeing(edit, ir):
        assert edit.store_constants({(index_of(ir, "L1"), 1): 2 * weight, (index_of(ir, "L2"), 1): 2 * weight}) == ["W"]

    model = edited(chain(), agreeing)
    assert [t.name for t in model.graph.initializer] == ["W"]
    np.testing.assert_allclose(run(model, {"x": X})[0], np.maximum(X @ (2 * weight).T, 0) @ (2 * weight).T,
                               rtol=1e-5)


def test_fresh_names_count_the_ones_handed_out():
    ir = GraphIR(io.from_proto(chain()))
    edit = GraphEditor(ir)
    assert edit.fresh_name("W") == "W1"
    assert edit.fresh_name("W") == "W2"
    assert edit.fresh_prefix("h/grown") == "h/grown0"
    assert edit.fresh_prefix("h/grown") == "h/grown1"


def test_rename_reaches_queued_nodes_and_declarations():
    def edits(edit, ir):
        edit.append([H("Identity", ["y"], ["y_out"], name="late")])
        edit.rename_tensor("y", "y_wide")
        edit.append([H("Identity", ["y_wide"], ["y"], name="restore")])

    model = edited(chain(), edits)
    late = next(n for n in model.graph.node if n.name == "late")
    assert list(late.input) == ["y_wide"]
    np.testing.assert_allclose(run(model, {"x": X})[0], run(chain(), {"x": X})[0], rtol=1e-6)


def test_orphans_go_and_the_inputs_unread_initializer_stays():
    rng = np.random.default_rng(2)
    nodes = [H("Mul", ["V", "g"], ["Wc"], name="computed"), H("Gemm", ["x", "Wc"], ["y"], name="L", transB=1)]
    model = make_model(nodes, [("x", [2, 4])], ["y"], {"V": rand(rng, 3, 4), "g": np.float32(2.0),
                                                        "unused": rand(rng, 2)})

    def edits(edit, ir):
        value = onnx.numpy_helper.to_array(ir.initializers["V"]) * 2
        name = edit.add_initializer(value, edit.fresh_name("Wc_folded"))
        edit.set_input(index_of(ir, "L"), 1, name)

    grown = edited(model, edits)
    assert [n.name for n in grown.graph.node] == ["L"]
    assert sorted(t.name for t in grown.graph.initializer) == ["Wc_folded", "unused"]
    np.testing.assert_allclose(run(grown, {"x": X})[0], run(model, {"x": X})[0], rtol=1e-6)


def test_set_constant_keeps_a_constant_nodes_dtype():
    nodes = [H("Constant", [], ["k"], name="k", value=onnx.numpy_helper.from_array(np.ones(4, np.float16))),
             H("Cast", ["k"], ["k32"], to=onnx.TensorProto.FLOAT), H("Add", ["x", "k32"], ["y"], name="add")]
    model = make_model(nodes, [("x", [2, 4])], ["y"])

    def edits(edit, ir):
        edit.set_constant(ir.const_root("k"), np.full(4, 3.0))

    grown = edited(model, edits)
    np.testing.assert_allclose(run(grown, {"x": X})[0], X + 3.0, rtol=1e-6)
    assert helper.get_attribute_value(grown.graph.node[0].attribute[0]).data_type == onnx.TensorProto.FLOAT16


def test_an_orphan_goes_and_a_tensor_read_only_in_a_nested_subgraph_stays():
    """`t` is read only by an If inside another If's branch: its producer stays;
    `s`, read by the outer If until the edit, goes with its producer."""
    def branch(name, inner):
        return helper.make_graph(inner, name, [], [helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT,
                                                                                 [2, 4])])

    leaf = [H("Identity", ["t"], ["inner_then_out"])]
    inner = H("If", ["c"], ["outer_then_out"], name="inner_if",
              then_branch=branch("inner_then", leaf),
              else_branch=branch("inner_else", [H("Identity", ["x"], ["inner_else_out"])]))
    nodes = [H("Neg", ["x"], ["t"], name="producer"), H("Abs", ["x"], ["s"], name="orphaned"),
             H("If", ["c"], ["y_if"], name="outer_if", then_branch=branch("outer_then", [inner]),
               else_branch=branch("outer_else", [H("Identity", ["x"], ["outer_else_out"])])),
             H("Add", ["y_if", "s"], ["y"], name="final")]
    model = make_model(nodes, [("x", [2, 4]), helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
                       [("y", [2, 4])])

    def edits(edit, ir):
        edit.set_input(index_of(ir, "final"), 1, "y_if")

    grown = edited(model, edits)
    assert [n.name for n in grown.graph.node] == ["producer", "outer_if", "final"]
    np.testing.assert_allclose(run(grown, {"x": X, "c": np.array(True)})[0], -2 * X)


def test_commit_inserts_queued_nodes_and_then_refuses_stale_indices():
    """After the node list is rebuilt, index-based edits are refused, not misplaced."""
    handle = io.from_proto(chain())
    ir = GraphIR(handle)
    edit = GraphEditor(ir)
    relu, second = index_of(ir, "relu"), index_of(ir, "L2")
    edit.insert_before(second, [H("Neg", ["r"], ["r_neg"], name="neg")])
    edit.set_input(second, 0, "r_neg")
    edit.commit()
    assert [n.name for n in handle.proto.graph.node] == ["L1", "relu", "neg", "L2"]
    np.testing.assert_allclose(run(handle.proto, {"x": X})[0],
                               np.maximum(X @ onnx.numpy_helper.to_array(ir.initializers["W"]).T, 0) * -1
                               @ onnx.numpy_helper.to_array(ir.initializers["W"]).T, rtol=1e-5)
    for late_edit in (lambda: edit.set_input(relu, 0, "x"), lambda: edit.insert_before(relu, []),
                      lambda: edit.store_constants({})):
        with pytest.raises(RuntimeError, match="rebuilt"):
            late_edit()


def test_redirect_and_rename_refuse_a_tensor_read_inside_a_subgraph():
    """A subgraph's read would silently keep the old tensor: refused instead."""
    branch = helper.make_graph([H("Identity", ["h"], ["b_out"])], "b", [],
                               [helper.make_tensor_value_info("b_out", onnx.TensorProto.FLOAT, [2, 4])])
    nodes = [H("Neg", ["x"], ["h"], name="neg"), H("Relu", ["h"], ["r"], name="relu"),
             H("If", ["c"], ["y"], name="if", then_branch=branch, else_branch=branch)]
    model = make_model(nodes, [("x", [2, 4]), helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
                       [("y", [2, 4]), ("r", [2, 4])])
    ir = GraphIR(io.from_proto(model))
    with pytest.raises(NotImplementedError, match="inside a subgraph"):
        GraphEditor(ir).redirect_uses("h", "x")
    with pytest.raises(NotImplementedError, match="inside a subgraph"):
        GraphEditor(ir).rename_tensor("h", "h_wide")
    assert list(ir.nodes[index_of(ir, "relu")].input) == ["h"]


def test_fresh_names_avoid_names_defined_only_inside_subgraphs():
    """An If branch defines 'W/widened' locally: a new main-graph tensor of that
    name would clash with it (ONNX names are unique across nested scopes)."""
    model = chain()
    branch = helper.make_graph([H("Identity", ["W"], ["W/widened"], name="W/widened_node")], "branch", [],
                               [helper.make_tensor_value_info("W/widened", onnx.TensorProto.FLOAT, [4, 4])])
    model.graph.node.append(H("If", ["flag"], ["w_out"], name="pick", then_branch=branch, else_branch=branch))
    model.graph.input.append(helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, []))
    model.graph.output.append(helper.make_tensor_value_info("w_out", onnx.TensorProto.FLOAT, [4, 4]))
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])

    def differing(edit, ir):
        written = edit.store_constants({(index_of(ir, "L2"), 1): 2 * weight})
        assert written and written[0] != "W/widened"

    grown = edited(model, differing)
    y, w_out = run(grown, {"x": X, "flag": np.array(True)})
    np.testing.assert_allclose(w_out, weight)
    np.testing.assert_allclose(y, np.maximum(X @ weight.T, 0) @ (2 * weight).T, rtol=1e-5)
