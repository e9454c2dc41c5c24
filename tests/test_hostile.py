"""Hostile and broken inputs: the CLI refuses each with exit code 2 and one
line on stderr naming the problem, prints no traceback, writes nothing, and
leaves the input untouched (every file in the folder is hashed before and
after). The CLI runs in a subprocess, as a user would run it.

External data that points outside the model's folder points at a FIFO: opening
it would block, so a test that finishes shows the tool refused before opening
anything outside the folder.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import ROOT, mlp_model

TIMEOUT = 120


# ----------------------------------------------------------------------------
# Helpers


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run_many([args], cwd=cwd)[0]


def run_many(commands: list, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run several CLI commands at once (each in its own process)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    processes = [subprocess.Popen([sys.executable, "-m", "onnx_net2net", *map(str, args)], cwd=cwd, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for args in commands]
    results = []
    try:
        for args, process in zip(commands, processes):
            out, err = process.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(list(args), process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too): file hashes, link targets, folders."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = "link:" + os.readlink(path)
        elif stat.S_ISFIFO(path.lstat().st_mode):
            state[key] = "fifo"
        elif path.is_dir():
            state[key] = "dir"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    stderr = result.stderr
    assert result.returncode == 2, (result.returncode, stderr, result.stdout)
    assert "Traceback" not in stderr and "Traceback" not in result.stdout, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnx_net2net: error: "), stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def dense_model() -> onnx.ModelProto:
    """x[N, 4] -> fc1 (Gemm, 8 units) -> Relu -> fc2 (Gemm, 3 units) -> y."""
    return mlp_model(4, 8, 3)


def save_external(model: onnx.ModelProto, path: Path, location: str = "model.onnx.data") -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def set_external(path: Path, **entries: str) -> None:
    """Rewrite the external data entries of every external tensor of the model file."""
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        current = {e.key: e.value for e in tensor.external_data}
        current.update(entries)
        del tensor.external_data[:]
        for key, value in current.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A FIFO outside the model's folder: a reader would block on it."""
    fifo = tmp_path / "outside.data"
    os.mkfifo(fifo)
    return fifo


def check_all_commands(folder: Path, model: str, *words: str, commands=("widen", "inspect", "info", "verify")):
    """Each command refuses the model (exit 2, one line naming it); nothing changes in the folder."""
    before = snapshot(folder.parent)
    arguments = {"widen": ["widen", model, "--layer", "fc1=10", "-o", "out.onnx"],
                 "deepen": ["deepen", model, "--after", "fc1", "-o", "out2.onnx"],
                 "verify": ["verify", model, model]}
    for result in run_many([arguments.get(command, [command, model]) for command in commands], cwd=folder):
        assert_refused(result, *words)
    assert snapshot(folder.parent) == before


# ----------------------------------------------------------------------------
# Files that are not models


def test_empty_file(folder):
    (folder / "m.onnx").write_bytes(b"")
    check_all_commands(folder, "m.onnx", "m.onnx", "empty")


def test_random_bytes(folder):
    rng = np.random.default_rng(7)
    (folder / "m.onnx").write_bytes(bytes([0x08, 0x08, 0x3A]) + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    check_all_commands(folder, "m.onnx", "m.onnx", "not")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_truncated_protobuf(folder, fraction):
    data = dense_model().SerializeToString()
    (folder / "m.onnx").write_bytes(data[: int(len(data) * fraction)])
    check_all_commands(folder, "m.onnx", "m.onnx")


def test_truncated_at_a_field_boundary(folder):
    """Cut after the graph's nodes: protobuf parses it, the graph has no outputs/weights."""
    model = dense_model()
    data = model.SerializeToString()
    graph = model.graph.SerializeToString()
    start = data.index(graph)
    cut = start + len(b"".join(n.SerializeToString() for n in model.graph.node)) + 3 * 2
    (folder / "m.onnx").write_bytes(data[:cut])
    check_all_commands(folder, "m.onnx", "m.onnx", commands=("widen", "inspect", "verify"))


def test_json_file(folder):
    (folder / "m.onnx").write_text('{"model": "resnet", "layers": [1, 2, 3]}\n')
    check_all_commands(folder, "m.onnx", "m.onnx", "JSON")


def test_text_file(folder):
    (folder / "m.onnx").write_text("this is not a model\njust some text\n")
    check_all_commands(folder, "m.onnx", "m.onnx", "text")


def test_onnx_text_format(folder):
    (folder / "m.onnx").write_text(onnx.printer.to_text(dense_model()))
    check_all_commands(folder, "m.onnx", "m.onnx", "text")


def test_missing_file(folder):
    check_all_commands(folder, "nothing.onnx", "nothing.onnx", "no such file")


def test_directory_as_model(folder):
    (folder / "m.onnx").mkdir()
    check_all_commands(folder, "m.onnx", "m.onnx", "directory")


def test_fifo_as_model(folder):
    os.mkfifo(folder / "m.onnx")
    check_all_commands(folder, "m.onnx", "m.onnx", "not a regular file")


# ----------------------------------------------------------------------------
# Valid protobuf, broken model


def test_cycle(folder):
    model = dense_model()
    nodes = list(model.graph.node)
    nodes[0].input[0] = "y"  # fc1 reads fc2's output
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", "cycle", commands=("widen", "inspect", "deepen"))


def test_dangling_input(folder):
    model = dense_model()
    model.graph.node[1].input[0] = "ghost"
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", "ghost", commands=("widen", "inspect", "deepen"))


def test_output_nothing_produces(folder):
    model = dense_model()
    model.graph.output[0].name = "nowhere"
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", "nowhere", commands=("widen", "inspect", "deepen"))


def test_unsupported_opset(folder):
    model = dense_model()
    model.opset_import[0].version = 999
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", "opset 999")


def test_unsupported_ir_version(folder):
    model = dense_model()
    model.ir_version = onnx.IR_VERSION + 50
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", f"IR version {onnx.IR_VERSION + 50}")


def test_ir_version_too_old(folder):
    model = dense_model()
    model.ir_version = 1
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", "IR version 1")


def test_declared_shapes_contradict_weights(folder):
    model = dense_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5  # fc1's weight has 4 rows
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", "shape", commands=("widen", "inspect", "deepen"))


def test_declared_output_shape_contradicts_weights(folder):
    model = dense_model()
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7  # fc2 makes 3
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", "shape", commands=("widen", "inspect", "deepen"))


def test_weight_data_contradicts_its_dims(folder):
    model = dense_model()
    model.graph.initializer[0].dims[1] = 9  # 4x9 declared, 4x8 stored
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", "W1")


def test_weight_of_unknown_data_type(folder):
    model = dense_model()
    model.graph.initializer[1].data_type = 77
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    check_all_commands(folder, "m.onnx", "b1", "data type")


# ----------------------------------------------------------------------------
# External data


def test_external_data_absolute(folder, outside):
    save_external(dense_model(), folder / "m.onnx")
    set_external(folder / "m.onnx", location=str(outside))
    check_all_commands(folder, "m.onnx", "absolute")


def test_external_data_escapes_folder(folder, outside):
    save_external(dense_model(), folder / "m.onnx")
    set_external(folder / "m.onnx", location="../" + outside.name)
    check_all_commands(folder, "m.onnx", "escapes")


def test_external_data_escapes_through_subfolder(folder, outside):
    (folder / "sub").mkdir()
    save_external(dense_model(), folder / "m.onnx")
    set_external(folder / "m.onnx", location="sub/../../" + outside.name)
    check_all_commands(folder, "m.onnx", "escapes")


def test_external_data_symlink_out_of_folder(folder, outside):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    (folder / "w.data").unlink()
    (folder / "w.data").symlink_to(outside)
    check_all_commands(folder, "m.onnx", "outside")


def test_external_data_symlinked_folder_out_of_folder(folder, outside):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    set_external(folder / "m.onnx", location="d/" + outside.name)
    (folder / "d").symlink_to(outside.parent)
    check_all_commands(folder, "m.onnx", "outside")


def test_external_data_dotdot_through_a_symlinked_folder(folder, tmp_path):
    """'d/../secret.data' reads as 'secret.data' lexically (and a genuine
    secret.data sits in the folder), but the kernel resolves the link d first:
    the file opened would be outside. Refused, and the FIFO is never opened."""
    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    os.mkfifo(outer / "secret.data")
    save_external(dense_model(), folder / "m.onnx", location="secret.data")
    set_external(folder / "m.onnx", location="d/../secret.data")
    (folder / "d").symlink_to(outer / "inner")
    check_all_commands(folder, "m.onnx", "outside")


def test_external_data_past_end_of_file(folder):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    size = (folder / "w.data").stat().st_size
    set_external(folder / "m.onnx", offset=str(size - 8))
    check_all_commands(folder, "m.onnx", "past the end")


def test_external_data_truncated_file(folder):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    data = (folder / "w.data").read_bytes()
    (folder / "w.data").write_bytes(data[: len(data) // 2])
    check_all_commands(folder, "m.onnx", "past the end")


def test_external_data_length_disagrees_with_shape(folder):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    set_external(folder / "m.onnx", offset="0", length="4")
    check_all_commands(folder, "m.onnx", "bytes")


def test_external_data_missing_file(folder):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    (folder / "w.data").unlink()
    check_all_commands(folder, "m.onnx", "w.data", "missing")


def test_external_data_is_a_directory(folder):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    (folder / "w.data").unlink()
    (folder / "w.data").mkdir()
    check_all_commands(folder, "m.onnx", "w.data", "not a regular file")


def test_external_data_bad_offset(folder):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    set_external(folder / "m.onnx", offset="12abc")
    check_all_commands(folder, "m.onnx", "offset", "12abc")


def test_external_data_negative_offset(folder):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    set_external(folder / "m.onnx", offset="-64")
    check_all_commands(folder, "m.onnx", "offset", "negative")


def test_external_data_location_with_nul(folder):
    save_external(dense_model(), folder / "m.onnx", location="w.data")
    set_external(folder / "m.onnx", location="w.data\0../../etc/passwd")
    check_all_commands(folder, "m.onnx", "NUL")


# ----------------------------------------------------------------------------
# Bad requests on a good model


@pytest.fixture
def good(folder) -> Path:
    path = folder / "m.onnx"
    path.write_bytes(dense_model().SerializeToString())
    return path


def _refuse_widen(folder: Path, *args, words=()):
    before = snapshot(folder.parent)
    result = run_cli("widen", "m.onnx", *args, cwd=folder)
    assert_refused(result, *words)
    assert snapshot(folder.parent) == before
    return result


def test_widen_below_current_width(good, folder):
    _refuse_widen(folder, "--layer", "fc1=4", "-o", "out.onnx", words=("fc1", "4", "8"))


def test_widen_to_the_current_width(good, folder):
    _refuse_widen(folder, "--layer", "fc1=8", "-o", "out.onnx", words=("fc1", "not larger"))


def test_widen_to_an_absurd_width(good, folder):
    """Refused from the arithmetic, before allocating: the message gives the
    estimate (an attempt would have ended in MemoryError's "out of memory")."""
    result = _refuse_widen(folder, "--layer", "fc1=1000000000000", "-o", "out.onnx", words=("1000000000000",))
    assert "GiB" in result.stderr


def constant_weight_model() -> onnx.ModelProto:
    """dense_model with its weights in Constant nodes instead of initializers."""
    model = dense_model()
    constants = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
                 for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("width", ["1000000000000", "100000000000000000000000"])
def test_widen_to_an_absurd_width_with_constant_node_weights(folder, width):
    """The memory estimate must count weights held in Constant nodes too: refused
    from the arithmetic (exit 2, 'GiB'), not by trying (MemoryError, or numpy's
    'Maximum allowed dimension exceeded' as an internal error)."""
    (folder / "m.onnx").write_bytes(constant_weight_model().SerializeToString())
    result = _refuse_widen(folder, "--layer", f"fc1={width}", "-o", "out.onnx", words=(width,))
    assert "GiB" in result.stderr


def test_widen_width_not_a_number(good, folder):
    _refuse_widen(folder, "--layer", "fc1=wide", "-o", "out.onnx", words=("fc1=wide",))


def test_widen_unknown_layer(good, folder):
    _refuse_widen(folder, "--layer", "fc9=12", "-o", "out.onnx", words=("fc9", "unknown"))


def test_deepen_unknown_layer(good, folder):
    before = snapshot(folder.parent)
    assert_refused(run_cli("deepen", "m.onnx", "--after", "fc9", "-o", "out.onnx", cwd=folder), "fc9")
    assert snapshot(folder.parent) == before


def test_output_is_the_input(good, folder):
    _refuse_widen(folder, "--layer", "fc1=10", "-o", "m.onnx", words=("input",))


def test_output_is_the_input_through_a_symlink(good, folder):
    (folder / "alias.onnx").symlink_to("m.onnx")
    _refuse_widen(folder, "--layer", "fc1=10", "-o", "alias.onnx", words=("input",))


def test_output_is_the_input_spelled_differently(good, folder):
    (folder / "sub").mkdir()
    _refuse_widen(folder, "--layer", "fc1=10", "-o", "./sub/../m.onnx", words=("input",))


def test_output_is_a_directory(good, folder):
    (folder / "out.onnx").mkdir()
    _refuse_widen(folder, "--layer", "fc1=10", "-o", "out.onnx", words=("directory",))


def test_output_folder_missing(good, folder):
    _refuse_widen(folder, "--layer", "fc1=10", "-o", "missing/out.onnx", words=("does not exist",))


def test_output_folder_read_only(good, folder):
    readonly = folder / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        _refuse_widen(folder, "--layer", "fc1=10", "-o", "ro/out.onnx", words=("read-only",))
    finally:
        readonly.chmod(0o755)


def test_output_data_file_would_overwrite_the_input_data(folder):
    save_external(dense_model(), folder / "m.onnx", location="out.onnx.data")
    _refuse_widen(folder, "--layer", "fc1=10", "-o", "out.onnx", "--external-data", "yes", words=("data",))


def test_a_good_run_still_works(good, folder):
    """The baseline the refusals are measured against."""
    result = run_cli("widen", "m.onnx", "--layer", "fc1=10", "-o", "out.onnx", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert (folder / "out.onnx").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "out.onnx"]


# ----------------------------------------------------------------------------
# Internal errors and usage errors (in-process: cli.main)


def _main(args, capsys) -> tuple[int, str, str]:
    from onnx_net2net import cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:  # argparse errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", ["info", "inspect", "widen", "deepen", "verify"])
def test_internal_error_says_it_is_a_bug(good, folder, capsys, monkeypatch, command):
    """A bug (any exception that is not a UserError) exits 3 with one line
    that says it is a bug, and no traceback; nothing is written."""
    from onnx_net2net import info, inspection, passes, verification

    def boom(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(info, "model_info", boom)
    monkeypatch.setattr(inspection, "inspect_model", boom)
    monkeypatch.setattr(passes.WidenPass, "apply", boom)
    monkeypatch.setattr(passes.DeepenPass, "apply", boom)
    monkeypatch.setattr(verification, "verify_models", boom)
    args = {"info": ["info", good], "inspect": ["inspect", good], "verify": ["verify", good, good],
            "widen": ["widen", good, "--layer", "fc1=10", "-o", folder / "out.onnx"],
            "deepen": ["deepen", good, "--after", "fc1", "-o", folder / "out.onnx"]}[command]
    before = snapshot(folder)
    code, out, err = _main(args, capsys)
    assert code == 3, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal error" in lines[0] and "bug" in lines[0], err
    assert "KeyError" in lines[0] and "Traceback" not in err + out
    assert snapshot(folder) == before


def test_internal_error_while_saving_leaves_nothing(good, folder, capsys, monkeypatch):
    from onnx_net2net import saving

    def broken(*args, **kwargs):
        raise RuntimeError("disk gremlin")

    monkeypatch.setattr(saving, "write_model", broken)
    before = snapshot(folder)
    code, out, err = _main(["widen", good, "--layer", "fc1=10", "-o", folder / "out.onnx"], capsys)
    assert code == 3 and "disk gremlin" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(folder) == before  # the staging folder is gone too


@pytest.mark.parametrize("args, words", [
    ([], ("required",)),
    (["grow-sideways", "m.onnx"], ("invalid choice",)),
    (["widen", "m.onnx", "--layer", "fc1=10"], ("-o",)),
    (["widen", "m.onnx", "-o", "out.onnx"], ("--layer",)),
    (["widen", "m.onnx", "--layer", "fc1=10", "--factor", "2", "-o", "out.onnx"], ("either",)),
    (["widen", "m.onnx", "--factor", "0.5", "-o", "out.onnx"], ("factor",)),
    (["widen", "m.onnx", "--layer", "fc1=10", "-o", "out.onnx", "--rtol", "-1"], ("rtol",)),
    (["widen", "m.onnx", "--layer", "fc1=10", "-o", "out.onnx", "--input-shapes", "x:[a,b]"], ("input-shapes",)),
    (["widen", "m.onnx", "--layer", "fc1=10", "-o", "out.onnx", "--inputs", "missing.npz"], ("missing.npz",)),
    (["deepen", "m.onnx", "--after", "fc1", "--kernel", "2", "-o", "out.onnx"], ("kernel",)),
    (["verify", "m.onnx"], ("candidate",)),
])
def test_usage_errors_are_one_line(good, folder, capsys, monkeypatch, args, words):
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    code, out, err = _main(args, capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out, err
    assert err.startswith("onnx_net2net")
    for word in words:
        assert word in err, (word, err)
    assert snapshot(folder) == before
