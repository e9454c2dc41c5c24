"""load -> GraphIR -> save keeps the model: same function, same structure,
external data kept external, atomic and safe writes."""

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_net2net as n2n
from onnx_net2net import io
from onnx_net2net.errors import ModelLoadError, UnsafePathError, UserError
from onnx_net2net.ir import GraphIR
from helpers import (H, SHIPPED, assert_same_function, make_model, model_path, rand, random_feeds, run, session,
                     widen_exact)


def kitchen_sink_model() -> onnx.ModelProto:
    """Constant nodes, Identity on a shared weight, an initializer that is also a
    graph input, unnamed nodes, metadata, value_info, two inputs and outputs."""
    rng = np.random.default_rng(0)
    inits = {"W": rand(rng, 4, 4), "B": rand(rng, 4), "W3": rand(rng, 3, 4), "W4": rand(rng, 4, 2)}
    nodes = [
        H("Constant", [], ["scale"], name="const_scale", value=numpy_helper.from_array(np.full(4, 0.5, np.float32))),
        H("Identity", ["W"], ["W_shared_a"], name="id_a"),
        H("Identity", ["W"], ["W_shared_b"]),                                  # unnamed
        H("Gemm", ["x", "W_shared_a", "B"], ["h1"], name="L1", transB=1),
        H("Relu", ["h1"], ["r1"]),                                             # unnamed
        H("Mul", ["r1", "scale"], ["s1"], name="scale_mul"),
        H("Add", ["s1", "x2"], ["s2"], name="add_x2"),
        H("Gemm", ["s2", "W_shared_b"], ["h2"], name="L2", transB=1),
        H("Tanh", ["h2"], ["t2"]),
        H("Gemm", ["t2", "W3"], ["y"], name="L3", transB=1),
        H("Gemm", ["t2", "W4"], ["y2"], name="L4"),
    ]
    model = make_model(nodes, [("x", ["N", 4]), ("x2", ["N", 4]), ("B", [4])], [("y", ["N", 3]), ("y2", ["N", 2])],
                       inits)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.helper.set_model_props(model, {"author": "tests", "purpose": "round trip"})
    model.producer_name, model.producer_version, model.doc_string = "tests", "1.0", "kitchen sink"
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    return model


def roundtrip(src: Path, out: Path, **save_kwargs) -> onnx.ModelProto:
    handle = io.load(src)
    ir = GraphIR(handle)
    assert ir.topological_order()
    io.save(handle, out, **save_kwargs)
    onnx.checker.check_model(str(out), full_check=True)
    return onnx.load(str(out))


def assert_same_structure(a: onnx.ModelProto, b: onnx.ModelProto):
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    assert [(o.domain, o.version) for o in a.opset_import] == [(o.domain, o.version) for o in b.opset_import]
    assert [(p.key, p.value) for p in a.metadata_props] == [(p.key, p.value) for p in b.metadata_props]
    assert list(a.graph.value_info) == list(b.graph.value_info)
    assert list(a.graph.input) == list(b.graph.input)
    assert list(a.graph.output) == list(b.graph.output)
    assert (a.ir_version, a.producer_name, a.producer_version, a.doc_string) == \
        (b.ir_version, b.producer_name, b.producer_version, b.doc_string)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_roundtrip(name, tmp_path):
    src = model_path(name)
    out = roundtrip(src, tmp_path / f"{name}.onnx")
    original = onnx.load(str(src))
    assert_same_structure(original, out)
    assert out == original
    assert_same_function(original, out)


def test_kitchen_sink_roundtrip(tmp_path):
    model = kitchen_sink_model()
    src = tmp_path / "sink.onnx"
    onnx.save(model, str(src))
    (tmp_path / "out").mkdir()
    out = roundtrip(src, tmp_path / "out" / "sink.onnx")
    assert_same_structure(model, out)
    assert out == model
    assert len(out.graph.value_info) > 0
    assert [n.name for n in out.graph.node].count("") == 3
    assert [i.name for i in out.graph.input] == ["x", "x2", "B"]
    assert [o.name for o in out.graph.output] == ["y", "y2"]
    assert {p.key: p.value for p in out.metadata_props} == {"author": "tests", "purpose": "round trip"}
    assert_same_function(model, out)


def test_kitchen_sink_widen_keeps_the_rest(tmp_path):
    """Widening L1 (weight behind an Identity, bias also a graph input) keeps
    names, metadata and the order of inputs and outputs."""
    model = kitchen_sink_model()
    # L1's units meet x2 in an Add: x2's width is fixed, so L1 cannot grow; L2 can.
    wider, _ = widen_exact(model, {"L2": 6})
    assert [n.name for n in model.graph.node if n.name] == [n.name for n in wider.graph.node if n.name]
    assert [i.name for i in wider.graph.input] == ["x", "x2", "B"]
    assert [o.name for o in wider.graph.output] == ["y", "y2"]
    assert {p.key: p.value for p in wider.metadata_props} == {"author": "tests", "purpose": "round trip"}
    assert [(o.domain, o.version) for o in wider.opset_import] == [("", 17), ("ai.onnx.ml", 3)]
    with pytest.raises(n2n.GrowthRefused, match="graph input 'x2'"):
        n2n.widen(model, {"L1": 6})


def test_kitchen_sink_inputs_are_not_initializers():
    ir = GraphIR(io.from_proto(kitchen_sink_model()))
    assert ir.graph_inputs == ["x", "x2"]          # B is an initializer with a default
    assert "B" in ir.initializers


# ----------------------------------------------------------------------------
# External data


def save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)         # onnx.save converts the proto it is given in place
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)


def test_external_data_kept_external(tmp_path):
    model = onnx.load(str(model_path("cnn")))
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    save_external(model, src_dir / "cnn.onnx", "weights.bin")
    handle = io.load(src_dir / "cnn.onnx")
    assert handle.has_external_data()
    io.save(handle, out_dir / "grown.onnx")
    data = out_dir / "grown.onnx.data"
    assert data.is_file() and data.stat().st_size > 30_000
    assert (out_dir / "grown.onnx").stat().st_size < 20_000
    out = onnx.load(str(out_dir / "grown.onnx"), load_external_data=False)
    external = [t.name for t in out.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert "9.weight" in external and "4.weight" in external       # big tensors external
    assert "0.weight" not in external                                # 288 bytes: inline
    locations = {e.value for t in out.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"grown.onnx.data"}
    onnx.checker.check_model(str(out_dir / "grown.onnx"))
    assert_same_function(model_path("cnn"), out_dir / "grown.onnx")
    # the input was not touched
    assert (src_dir / "weights.bin").is_file()
    assert sorted(p.name for p in out_dir.iterdir()) == ["grown.onnx", "grown.onnx.data"]


def test_external_data_widened_model(tmp_path):
    model = onnx.load(str(model_path("mlp")))
    save_external(model, tmp_path / "mlp.onnx", "mlp.weights")
    wider, _ = n2n.widen(str(tmp_path / "mlp.onnx"), {"/0/Gemm": 56})
    out = tmp_path / "out.onnx"
    n2n.save(wider, out, external=True)
    assert (tmp_path / "out.onnx.data").is_file()
    assert_same_function(model, out)


def test_external_data_deepened_model(tmp_path):
    model = onnx.load(str(model_path("mlp")))
    save_external(model, tmp_path / "mlp.onnx", "mlp.weights")
    deeper, report = n2n.deepen(str(tmp_path / "mlp.onnx"), ["/0/Gemm"])
    assert report["verification"]["passed"] is True
    n2n.save(deeper, tmp_path / "out.onnx")
    assert_same_function(model, tmp_path / "out.onnx")


def test_external_data_inspect_with_trial(tmp_path):
    """Trial rewrites of an external-data model must verify like inline ones."""
    model = onnx.load(str(model_path("mlp")))
    save_external(model, tmp_path / "mlp.onnx", "mlp.weights")
    report = n2n.inspect(str(tmp_path / "mlp.onnx"), trial=True)
    inline = n2n.inspect(str(model_path("mlp")), trial=True)
    assert [(layer["widen"]["ok"], layer["deepen"]["ok"]) for layer in report["layers"]] == \
        [(layer["widen"]["ok"], layer["deepen"]["ok"]) for layer in inline["layers"]] == \
        [(True, True), (True, True), (False, False)]


def test_load_resolves_external_data(tmp_path):
    model = onnx.load(str(model_path("mlp")))
    save_external(model, tmp_path / "mlp.onnx", "mlp.weights")
    loaded = n2n.load(tmp_path / "mlp.onnx")
    assert all(t.data_location != TensorProto.EXTERNAL for t in loaded.graph.initializer)
    assert_same_function(model, loaded)


def test_external_data_outside_folder_is_refused(tmp_path):
    model = onnx.load(str(model_path("mlp")))
    inner = tmp_path / "inner"
    inner.mkdir()
    save_external(model, inner / "mlp.onnx", "mlp.weights")
    proto = onnx.load(str(inner / "mlp.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../mlp.weights"
    (tmp_path / "mlp.weights").write_bytes((inner / "mlp.weights").read_bytes())
    onnx.save(proto, str(inner / "evil.onnx"))
    with pytest.raises(UnsafePathError, match="escapes"):
        io.load(inner / "evil.onnx")


def test_external_data_truncated_is_refused(tmp_path):
    model = onnx.load(str(model_path("mlp")))
    save_external(model, tmp_path / "mlp.onnx", "mlp.weights")
    data = (tmp_path / "mlp.weights").read_bytes()
    (tmp_path / "mlp.weights").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="runs past the end"):
        io.load(tmp_path / "mlp.onnx")


# ----------------------------------------------------------------------------
# Safe writes


def test_save_never_overwrites_the_input(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(onnx.load(str(model_path("mlp"))), str(src))
    before = src.read_bytes()
    handle = io.load(src)
    with pytest.raises(UserError, match="input"):
        io.save(handle, src)
    assert src.read_bytes() == before


def test_failed_commit_leaves_nothing(tmp_path):
    handle = io.load(model_path("mlp"))

    def reject(staged: Path):
        assert staged.is_file()
        raise RuntimeError("verification says no")

    with pytest.raises(RuntimeError):
        io.save(handle, tmp_path / "out.onnx", before_commit=reject)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_removed(tmp_path):
    stale = tmp_path / ".out.onnx.onnx_net2net-999999999.tmp"
    stale.mkdir()
    (stale / "junk").write_bytes(b"x")
    io.save(io.load(model_path("mlp")), tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"", "empty file"),
                                              (b"not a model at all", "not")])
def test_load_errors(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        io.load(path)


def test_load_directory_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        io.load(tmp_path)


def test_save_to_missing_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        io.save(io.load(model_path("mlp")), tmp_path / "nope" / "out.onnx")


def test_api_save_and_load(tmp_path):
    model = onnx.load(str(model_path("cnn1d")))
    n2n.save(model, tmp_path / "a.onnx")
    loaded = n2n.load(tmp_path / "a.onnx")
    assert loaded == model
    feeds = random_feeds(model)
    for a, b in zip(run(model, feeds), run(loaded, feeds)):
        assert np.array_equal(a, b)
    assert session(tmp_path / "a.onnx").get_outputs()[0].name == "output"
    assert not os.path.exists(tmp_path / "a.onnx.data")


def test_initializers_declared_as_graph_inputs_follow_the_widening():
    rng = np.random.default_rng(1)
    inits = {"W1": rand(rng, 3, 4), "B1": rand(rng, 3), "W2": rand(rng, 2, 3)}
    nodes = [H("Gemm", ["x", "W1", "B1"], ["h"], name="L1", transB=1), H("Relu", ["h"], ["r"]),
             H("Gemm", ["r", "W2"], ["y"], name="L2", transB=1)]
    model = make_model(nodes, [("x", ["N", 4]), ("W1", [3, 4]), ("B1", [3]), ("W2", [2, 3])], ["y"], inits)
    wider, _ = widen_exact(model, {"L1": 5})
    declared = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in wider.graph.input}
    assert declared == {"x": ["N", 4], "W1": [5, 4], "B1": [5], "W2": [2, 5]}
    assert [i.name for i in wider.graph.input] == ["x", "W1", "B1", "W2"]
    onnx.checker.check_model(wider, full_check=True)


def test_unnamed_layers_are_named_by_their_weight(tmp_path):
    rng = np.random.default_rng(2)
    inits = {"fc1.weight": rand(rng, 3, 4), "fc2.weight": rand(rng, 2, 3)}
    nodes = [H("Gemm", ["x", "fc1.weight"], ["h"], transB=1), H("Relu", ["h"], ["r"]),
             H("Gemm", ["r", "fc2.weight"], ["y"], transB=1)]
    model = make_model(nodes, [("x", ["N", 4])], ["y"], inits)
    names = [layer["name"] for layer in n2n.inspect(model)["layers"]]
    assert names == ["fc1.weight", "fc2.weight"]
    wider, report = widen_exact(model, {"fc1.weight": 6})
    assert report["changes"][0]["layers"] == ["fc1.weight"]
    deeper, _ = n2n.deepen(wider, ["fc1.weight"])
    assert "fc1.weight/deeper0" in {n.name for n in deeper.graph.node}
    assert_same_function(model, deeper)
    out = tmp_path / "d.onnx"
    n2n.save(deeper, out)
    assert [n.name for n in onnx.load(str(out)).graph.node] == [n.name for n in deeper.graph.node]
