"""Region verification (onnx_net2net.region): the changed part of two graphs,
checked on its own, must agree with full verification on exact rewrites,
catch corrupted weights, and never read untouched external weights."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_net2net as n2n
from onnx_net2net import cli, io, region
from helpers import H, ReadSpy, make_model, model_path, rand

REWRITES = [
    ("mlp", "widen", "/2/Gemm"),
    ("cnn", "widen", "/4/Conv"),
    ("resnet_block", "widen", "/layer1/layer1.1/conv2/Conv"),
    ("dense_concat", "widen", "/dense2/conv/Conv"),
    ("gpt2_tiny", "widen", "/model/transformer/h.1/attn/c_attn/Gemm"),
    ("bert_tiny", "widen", "/model/bert/encoder/layer.1/attention/self/query/MatMul"),
    ("mlp", "deepen", "/0/Gemm"),            # identity after Relu: exact only for inputs >= 0
    ("cnn", "deepen", "/4/Conv"),
    ("resnet_block", "deepen", "/layer1/layer1.0/conv1/Conv"),
    ("sklearn_mlp", "deepen", "MatMul"),
]


def grow(name, kind, layer):
    path = str(model_path(name))
    if kind == "widen":
        width = next(l["width"] + l["widen"]["step"] for l in n2n.inspect(path, trial=False)["layers"]
                     if l["name"] == layer)
        new, _ = n2n.widen(path, {layer: width}, verify=False)
    else:
        new, _ = n2n.deepen(path, [layer], verify=False)
    return path, new


def handles(path, new):
    return io.load(path), io.from_proto(new)


def corrupted(new: onnx.ModelProto, weight: str, delta: float = 0.5) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(new)
    for tensor in bad.graph.initializer:
        if tensor.name == weight:
            value = numpy_helper.to_array(tensor).copy()
            value.flat[value.size // 2] += delta * (1 + np.abs(value).max())
            tensor.CopyFrom(numpy_helper.from_array(value, weight))
    return bad


@pytest.mark.parametrize("name,kind,layer", REWRITES)
def test_region_agrees_with_full_and_is_smaller(name, kind, layer):
    path, new = grow(name, kind, layer)
    old_h, new_h = handles(path, new)
    report = region.verify_region(old_h, new_h)
    assert report.passed, report.summary()
    assert n2n.verify(path, new).passed
    found = region.find_region(old_h, new_h)
    assert 0 < len(found.old_nodes) < len(old_h.graph.node)
    assert report.outputs and "region verification:" in report.notes[0]


@pytest.mark.parametrize("name,kind,layer", REWRITES)
def test_region_never_passes_what_full_fails(name, kind, layer):
    """Corrupt each rewritten weight in turn: whenever full verification
    fails, region verification must fail too."""
    path, new = grow(name, kind, layer)
    old_h = io.load(path)
    changed = region.find_region(old_h, io.from_proto(new)).changed_weights
    # Float weights: a corrupted shape constant (an integer) breaks the model outright.
    new_inits = {t.name for t in new.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    checked = 0
    for weight in [w for w in changed if w in new_inits][:6]:
        bad = corrupted(new, weight)
        if n2n.verify(path, bad).passed:
            continue  # a corruption the function does not see (e.g. a zeroed path)
        assert not region.verify_region(io.load(path), io.from_proto(bad)).passed, weight
        checked += 1
    assert checked > 0


def test_weight_changed_outside_the_rewrite_joins_the_region():
    """The diff is of the two graphs, not of what the rewrite says it did."""
    path, new = grow("cnn", "widen", "/4/Conv")
    bad = corrupted(new, "0.weight")
    found = region.find_region(io.load(path), io.from_proto(bad))
    assert "0.weight" in found.changed_weights
    assert not region.verify_region(io.load(path), io.from_proto(bad)).passed


def test_identical_models_pass_with_an_empty_region():
    handle = io.load(model_path("cnn"))
    report = region.verify_region(handle, io.load(model_path("cnn")))
    assert report.passed and not report.outputs and "same graph" in report.notes[0]


def test_cli_verify_region_pass_and_fail(tmp_path, capsys):
    path, new = grow("cnn", "widen", "/4/Conv")
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(new, str(good))
    onnx.save(corrupted(new, "4.weight"), str(bad))
    assert cli.main(["verify", path, str(good), "--verify", "region"]) == 0
    assert "region verification:" in capsys.readouterr().out
    assert cli.main(["verify", path, str(bad), "--verify", "region"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_cli_widen_and_deepen_with_region(tmp_path, capsys):
    path = str(model_path("resnet_block"))
    assert cli.main(["widen", path, "--layer", "/layer1/layer1.1/conv2/Conv=24", "-o", str(tmp_path / "w.onnx"),
                     "--verify", "region"]) == 0
    assert cli.main(["deepen", path, "--after", "/layer1/layer1.0/conv1/Conv", "-o", str(tmp_path / "d.onnx"),
                     "--verify", "region"]) == 0
    assert "PASSED" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        cli.main(["verify", path, str(tmp_path / "w.onnx"), "--verify", "bogus"])
    assert usage.value.code == 2


def test_changed_graph_output_shape_falls_back_to_full(tmp_path, capsys):
    def model(d_out):
        rng = np.random.default_rng(0)
        return make_model([H("MatMul", ["x", "W"], ["y"])], [("x", ["N", 4])], [("y", ["N", d_out])],
                          {"W": rand(rng, 4, d_out)})

    onnx.save(model(3), str(tmp_path / "a.onnx"))
    onnx.save(model(5), str(tmp_path / "b.onnx"))
    code = cli.main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--verify", "region"])
    captured = capsys.readouterr()
    assert code == 1
    assert "running full verification" in captured.err and "MISMATCH" in captured.out


def test_auto_chooses_by_size(monkeypatch):
    monkeypatch.setattr(region.io, "available_memory", lambda: 64 << 30)
    assert region.choose_mode("auto", 10 << 20) == "full"
    assert region.choose_mode("auto", 2 << 30) == "region"
    assert region.choose_mode("auto", 30 << 30) == "region"
    monkeypatch.setattr(region.io, "available_memory", lambda: 3 << 30)
    assert region.choose_mode("auto", 1536 << 20) == "region"   # above a third of free memory
    assert region.choose_mode("full", 30 << 30) == "full"


# ----------------------------------------------------------------------------
# External data: untouched weights are never read


def deep_mlp(layers=6, width=64):
    rng = np.random.default_rng(1)
    nodes, inits, x = [], {}, "x"
    for k in range(layers):
        inits[f"W{k}"], inits[f"b{k}"] = rand(rng, width, width), rand(rng, width)
        nodes += [H("MatMul", [x, f"W{k}"], [f"m{k}"], name=f"fc{k}"), H("Add", [f"m{k}", f"b{k}"], [f"h{k}"]),
                  H("Relu", [f"h{k}"], [f"a{k}"])]
        x = f"a{k}"
    return make_model(nodes, [("x", ["N", width])], [(x, ["N", width])], inits)


def save_external(model, path):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)


def test_widen_external_data_reads_only_the_region(tmp_path, monkeypatch, capsys):
    source = tmp_path / "src" / "mlp.onnx"
    source.parent.mkdir()
    save_external(deep_mlp(), source)
    spy = ReadSpy(monkeypatch, streamed=True)
    original = region.verify_region
    monkeypatch.setattr(region, "verify_region", lambda *a, **k: spy.names.clear() or original(*a, **k))
    code = cli.main(["widen", str(source), "--layer", "fc2=96", "-o", str(tmp_path / "out.onnx"),
                     "--verify", "region", "--report", str(tmp_path / "report.json")])
    assert code == 0, capsys.readouterr()
    # the region: fc2 (W2, b2 grow) and fc3 (W3 reads the wider tensor); the rest is never read
    assert set(spy.names) <= {"W2", "b2", "W3", "b3"}, spy.names
    assert {"W0", "W1", "W4", "W5"}.isdisjoint(spy.names)
    notes = json.loads((tmp_path / "report.json").read_text())["verification"]["notes"]
    assert any(note.startswith("region verification:") for note in notes)


def test_extracted_region_holds_only_its_weights(tmp_path):
    source = tmp_path / "mlp.onnx"
    save_external(deep_mlp(), source)
    old = io.load(source)
    new = io.from_proto(n2n.widen(str(source), {"fc2": 96}, verify=False)[0])
    found = region.find_region(old, new)
    for handle, nodes in ((old, found.old_nodes), (new, found.new_nodes)):
        model = region.extract(handle, nodes, found.inputs, found.outputs,
                               {n: onnx.helper.make_tensor_type_proto(1, None) for n in found.inputs + found.outputs},
                               keep_external=True)
        assert {t.name for t in model.graph.initializer} == {"W2", "b2", "W3"}


def test_verify_region_on_external_files_catches_corruption(tmp_path, capsys):
    model = deep_mlp()
    new, _ = n2n.widen(model, {"fc2": 96}, verify=False)
    save_external(model, tmp_path / "a.onnx")
    save_external(new, tmp_path / "b.onnx")
    save_external(corrupted(new, "W3"), tmp_path / "c.onnx")
    assert cli.main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--verify", "region"]) == 0
    assert cli.main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "c.onnx"), "--verify", "region"]) == 1
