"""io.load(path, lazy=True): large inline weights stay in the file until a
rewrite reads them, and save writes them back byte for byte as the eager path
does; the CLI's growth commands load lazily."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_net2net import cli, io
from onnx_net2net.errors import ModelLoadError
from onnx_net2net.passes import DeepenPass, WidenPass
from onnx_net2net.rewrites.deeper import DeepenOptions
from onnx_net2net.rewrites.wider import WidenOptions
from helpers import ReadSpy, assert_same_function

HIDDEN = 160  # 160 x 160 float32 = 100 KiB: above io.LAZY_TENSOR_BYTES; the biases stay below


def big_mlp(layers: int = 4) -> onnx.ModelProto:
    """Gemm + Relu layers whose weights are large enough to be deferred; one
    weight has a doc_string, one bias is stored as float_data (no raw_data)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        weight = numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * 0.1,
                                         f"fc{i}.weight")
        if i == 1:
            weight.doc_string = "a weight with a doc string"
        bias_values = rng.standard_normal(HIDDEN).astype(np.float32)
        bias = (helper.make_tensor(f"fc{i}.bias", TensorProto.FLOAT, [HIDDEN], bias_values.tolist()) if i == 2
                else numpy_helper.from_array(bias_values, f"fc{i}.bias"))
        inits += [weight, bias]
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [f"fc{i}_out"], name=f"fc{i}",
                                      transB=1))
        nodes.append(helper.make_node("Relu", [f"fc{i}_out"], [f"relu{i}_out"], name=f"relu{i}"))
        x = f"relu{i}_out"
    graph = helper.make_graph(nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", HIDDEN])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "mlp.onnx"
    path.parent.mkdir()
    onnx.save(big_mlp(), path)
    return path


def deferred_names(handle: io.ModelHandle) -> set[str]:
    return {t.name for t in handle.graph.initializer if handle.deferred_metadata(t) is not None}


def test_lazy_load_defers_only_large_raw_data_tensors(source):
    handle = io.load(source, lazy=True)
    assert deferred_names(handle) == {f"fc{i}.weight" for i in range(4)}
    assert not handle.has_external_data()
    eager = io.load(source)
    for lazy_tensor, eager_tensor in zip(handle.graph.initializer, eager.graph.initializer):
        np.testing.assert_array_equal(handle.array(lazy_tensor), eager.array(eager_tensor))


def test_lazy_inlined_is_the_eager_model(source):
    lazy, eager = io.load(source, lazy=True), io.load(source)
    assert lazy.inlined(copy=True).proto.SerializeToString() == eager.proto.SerializeToString()
    assert deferred_names(lazy)  # inlined(copy=True) left the handle itself lazy


@pytest.mark.parametrize("external", [False, True])
def test_lazy_save_is_byte_identical_to_eager(source, tmp_path, external):
    for lazy in (False, True):  # same file name (an external output names its data file)
        (tmp_path / str(lazy)).mkdir()
        io.save(io.load(source, lazy=lazy), tmp_path / str(lazy) / "out.onnx", external=external)
    for name in ["out.onnx"] + (["out.onnx.data"] if external else []):
        assert (tmp_path / "True" / name).read_bytes() == (tmp_path / "False" / name).read_bytes()


def test_inline_save_of_external_data_is_byte_identical(source, tmp_path):
    """External weights written inline are streamed the same way: same bytes as
    reading them into raw_data (today's eager form)."""
    io.save(io.load(source), tmp_path / "ext.onnx", external=True)
    handle = io.load(tmp_path / "ext.onnx")
    io.save(handle, tmp_path / "streamed.onnx", external=False)
    assert (tmp_path / "streamed.onnx").read_bytes() == eager_inline_bytes(handle)


def eager_inline_bytes(handle: io.ModelHandle) -> bytes:
    """The file the eager save wrote: the skeleton, then one ModelProto per
    initializer, an external one as name, type, dims and doc_string + raw_data."""
    skeleton = onnx.ModelProto()
    io.copy_fields(handle.proto, skeleton, skip="graph")
    io.copy_fields(handle.graph, skeleton.graph, skip="initializer")
    pieces = [skeleton.SerializeToString()]
    for tensor in handle.graph.initializer:
        piece = onnx.ModelProto()
        out = piece.graph.initializer.add()
        if tensor.data_location == TensorProto.EXTERNAL:
            out.name, out.data_type = tensor.name, tensor.data_type
            out.dims.extend(tensor.dims)
            if tensor.doc_string:
                out.doc_string = tensor.doc_string
            out.raw_data = handle.external_bytes(tensor)
        else:
            out.CopyFrom(tensor)
        pieces.append(piece.SerializeToString())
    return b"".join(pieces)


@pytest.mark.parametrize("grow, exact", [
    (WidenPass({"fc1": 240}, None, WidenOptions(), False), True),
    (WidenPass({"fc2": 200}, None, WidenOptions(noise=0.01, seed=3), False), False),
    (DeepenPass(["fc1"], DeepenOptions()), True),
], ids=["widen-fc1", "widen-fc2-noise", "deepen-fc1"])
def test_lazy_rewrite_equals_eager_rewrite(source, tmp_path, grow, exact):
    outputs = []
    for lazy in (False, True):
        handle = io.load(source, lazy=lazy)
        grow.apply(handle)
        outputs.append(io.save(handle, tmp_path / f"grown_{lazy}.onnx"))
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    if exact:
        assert_same_function(onnx.load(source), onnx.load(outputs[1]))


@pytest.mark.parametrize("verify", [["--no-verify"], ["--verify", "region"], ["--verify", "full"]])
def test_cli_widen_reads_only_the_grown_weights(source, tmp_path, monkeypatch, capsys, verify):
    spy = ReadSpy(monkeypatch)
    out = tmp_path / "out.onnx"
    code = cli.main(["widen", str(source), "--layer", "fc1=240", "-o", str(out), *verify])
    assert code == 0, capsys.readouterr()
    assert set(spy.names) <= {"fc1.weight", "fc2.weight"}, spy.names  # the group's producer and consumer
    assert_same_function(onnx.load(source), onnx.load(out))


def test_cli_region_verification_catches_a_corrupted_rewrite(source, tmp_path, monkeypatch, capsys):
    from onnx_net2net import editor

    original = editor.set_tensor_values

    def corrupt(tensor, values):
        if tensor.name == "fc2.weight":
            values = np.asarray(values) + 0.5
        original(tensor, values)

    monkeypatch.setattr(editor, "set_tensor_values", corrupt)
    code = cli.main(["widen", str(source), "--layer", "fc1=240", "-o", str(tmp_path / "out.onnx"),
                     "--verify", "region"])
    assert code != 0
    assert not (tmp_path / "out.onnx").exists()


def test_lazy_load_reports_a_short_payload_as_the_eager_load_does(tmp_path):
    model = big_mlp(layers=1)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path = tmp_path / "short.onnx"
    onnx.save(model, path)
    messages = []
    for lazy in (False, True):
        with pytest.raises(ModelLoadError) as error:
            io.load(path, lazy=lazy)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "needs" in messages[0]


@pytest.mark.parametrize("shape, axis", [((2100, 2200), 1), ((2200, 2100), 0), ((3, 1500, 1500), 1)])
def test_split_scaling_in_blocks_equals_one_float64_product(shape, axis):
    """The consumer's split is computed a block of rows at a time for large
    weights: the same float32 values as one float64 product rounded once."""
    from onnx_net2net.rewrites.wider import scaled_once

    rng = np.random.default_rng(1)
    value = rng.standard_normal(shape).astype(np.float32)
    factor_shape = [1] * len(shape)
    factor_shape[axis] = shape[axis]
    for factors in (1.0 / rng.integers(1, 4, shape[axis]).reshape(factor_shape), rng.uniform(0.2, 1, shape)):
        expected = (value.astype(np.float64) * factors).astype(np.float32)
        np.testing.assert_array_equal(scaled_once(value, factors), expected)


def _length_delimited(tag: int, payload: bytes) -> bytes:
    length, size = bytearray(), len(payload)
    while True:
        length.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            return bytes([tag]) + bytes(length) + payload


def test_lazy_parse_keeps_protobuf_semantics_for_a_repeated_raw_data(tmp_path):
    """A raw_data field given twice: protobuf keeps the last; so does the lazy parse."""
    model = big_mlp(layers=1)
    weight = TensorProto()
    weight.CopyFrom(model.graph.initializer[0])
    del model.graph.initializer[0]
    zeros = numpy_helper.from_array(np.zeros((HIDDEN, HIDDEN), np.float32), weight.name)
    twice = zeros.SerializeToString() + TensorProto(raw_data=weight.raw_data).SerializeToString()
    initializer = _length_delimited(7 << 3 | 2, _length_delimited(5 << 3 | 2, twice))  # ModelProto.graph.initializer
    path = tmp_path / "twice.onnx"
    path.write_bytes(model.SerializeToString() + initializer)
    lazy, eager = io.load(path, lazy=True), io.load(path)
    assert lazy.inlined(copy=True).proto.SerializeToString() == eager.proto.SerializeToString()
    np.testing.assert_array_equal(lazy.array(lazy.graph.initializer[-1]), numpy_helper.to_array(weight))


def test_cli_verify_region_holds_no_untouched_weight_whole(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.onnx"
    assert cli.main(["widen", str(source), "--layer", "fc1=240", "-o", str(out), "--no-verify"]) == 0
    from onnx_net2net import region

    spy, handles = ReadSpy(monkeypatch), []
    original = region.verify_pair

    def recording(old, new, *args, **kwargs):
        handles.extend([old, new])
        return original(old, new, *args, **kwargs)

    monkeypatch.setattr(region, "verify_pair", recording)
    code = cli.main(["verify", str(source), str(out), "--verify", "region"])
    assert code == 0, capsys.readouterr()
    untouched = {"fc3.weight"}
    assert all(untouched <= deferred_names(handle) for handle in handles)  # never loaded whole
    assert set(spy.names) <= {"fc1.weight", "fc2.weight"}, spy.names  # only the changed region's weights
    corrupted = onnx.load(out)
    weight = next(t for t in corrupted.graph.initializer if t.name == "fc2.weight")
    weight.raw_data = (numpy_helper.to_array(weight) + np.float32(0.5)).tobytes()
    onnx.save(corrupted, tmp_path / "bad.onnx")
    assert cli.main(["verify", str(source), str(tmp_path / "bad.onnx"), "--verify", "region"]) == 1
