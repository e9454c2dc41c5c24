"""Atomic output: a run killed at any point leaves no partial output (an older
output at the same path stays whole, or is gone, never mixed with new data),
and the next run into the folder removes the killed run's staging folder.

Each run is a real CLI process (`python -m onnx_net2net widen ...`) that kills
itself with SIGKILL at a chosen moment: after a number of bytes written into
the staged model or data file, during verification, or between the renames.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

from helpers import ROOT, mlp_model

TAG = ".onnx_net2net-"

# Runs the CLI with a SIGKILL planted at MOMENT; argv[1] is the moment, the rest the CLI arguments.
KILLER = textwrap.dedent('''
    import os, signal, sys
    from onnx_net2net import cli, saving

    moment, args = sys.argv[1], sys.argv[2:]

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    class Dying:
        """A file that dies after `budget` bytes have been written to it."""
        def __init__(self, f, budget):
            self.f, self.budget = f, budget
        def write(self, data):
            if self.budget <= len(data):
                self.f.write(data[: self.budget]); self.f.flush(); die()
            self.budget -= len(data)
            return self.f.write(data)
        def __getattr__(self, name):
            return getattr(self.f, name)

    original_write = saving.write_model
    def write_model(handle, model_file, data_file, data_name, *rest):
        if moment == "model-bytes":
            model_file = Dying(model_file, 200)
        elif moment == "data-bytes":
            data_file = Dying(data_file, 20000)
        return original_write(handle, model_file, data_file, data_name, *rest)
    saving.write_model = write_model

    if moment == "mismatch":
        from onnx_net2net import verification
        original_compare = verification.ReferenceRun.compare
        def compare(self, candidate):
            report = original_compare(self, candidate)
            report.passed = False
            return report
        verification.ReferenceRun.compare = compare
    if moment == "verification":
        from onnx_net2net import verification
        verification.ReferenceRun.compare = lambda self, candidate: die()
    if moment == "between-renames":
        original_replace = os.replace
        def replace(src, dst):
            original_replace(src, dst)
            if str(dst).endswith(".data"):
                die()
        saving.os.replace = replace
    sys.exit(cli.main(args))
''')


def big_model() -> onnx.ModelProto:
    """x[N, 64] -> fc1 (Gemm 64x256) -> Relu -> fc2 (Gemm 256x10): about 110 kB of weights."""
    return mlp_model(64, 256, 10, seed=1, scale=1 / 8)


def run(folder: Path, *args, moment: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-c", KILLER, moment] if moment else [sys.executable, "-m", "onnx_net2net"]
    return subprocess.run(command + [str(a) for a in args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=180)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stray(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TAG in p.name)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    onnx.save_model(big_model(), str(tmp_path / "in" / "m.onnx"))
    (tmp_path / "out").mkdir()
    return tmp_path


WIDEN = ("widen", "../in/m.onnx", "--layer", "fc1=300", "-o", "grown.onnx")


@pytest.mark.parametrize("moment, external", [("model-bytes", "no"), ("data-bytes", "yes"),
                                              ("model-bytes", "yes"), ("verification", "yes")])
def test_killed_run_leaves_no_output_and_the_next_run_cleans_up(folder, moment, external):
    out = folder / "out"
    source = digest(folder / "in" / "m.onnx")
    killed = run(out, *WIDEN, "--external-data", external, moment=moment)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "grown.onnx").exists() and not (out / "grown.onnx.data").exists()
    leftovers = stray(out)
    assert len(leftovers) == 1, leftovers  # the staging folder of the killed run, with its partial files
    assert list((out / leftovers[0]).iterdir())
    assert digest(folder / "in" / "m.onnx") == source

    again = run(out, *WIDEN, "--external-data", external)
    assert again.returncode == 0, again.stderr
    assert stray(out) == []
    expected = {"grown.onnx"} | ({"grown.onnx.data"} if external == "yes" else set())
    assert {p.name for p in out.iterdir()} == expected
    verify = run(out, "verify", "../in/m.onnx", "grown.onnx")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert digest(folder / "in" / "m.onnx") == source


@pytest.mark.parametrize("external", ["no", "yes"])
def test_killed_run_keeps_an_older_output_whole(folder, external):
    """A run killed while writing over an existing output leaves the older
    output as it was (model and data file)."""
    out = folder / "out"
    first = run(out, "widen", "../in/m.onnx", "--layer", "fc1=280", "-o", "grown.onnx", "--external-data", external)
    assert first.returncode == 0, first.stderr
    before = {p.name: digest(p) for p in out.iterdir()}
    killed = run(out, *WIDEN, "--external-data", external, moment="model-bytes")
    assert killed.returncode == -signal.SIGKILL
    assert {p.name: digest(p) for p in out.iterdir() if TAG not in p.name} == before
    assert run(out, "verify", "../in/m.onnx", "grown.onnx").returncode == 0


def test_killed_between_the_renames_never_pairs_an_old_model_with_new_data(folder):
    """The data file and the model are two renames. Killed between them, the
    older model is already gone: no model reads a data file it was not written with."""
    out = folder / "out"
    first = run(out, "widen", "../in/m.onnx", "--layer", "fc1=280", "-o", "grown.onnx", "--external-data", "yes")
    assert first.returncode == 0, first.stderr
    killed = run(out, *WIDEN, "--external-data", "yes", moment="between-renames")
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "grown.onnx").exists()
    again = run(out, *WIDEN, "--external-data", "yes")
    assert again.returncode == 0, again.stderr
    assert stray(out) == [] and {p.name for p in out.iterdir()} == {"grown.onnx", "grown.onnx.data"}
    assert run(out, "verify", "../in/m.onnx", "grown.onnx").returncode == 0


def test_a_live_runs_staging_folder_is_left_alone(folder):
    """Only staging folders of processes that are gone are removed."""
    out = folder / "out"
    live = out / f".other.onnx{TAG}{os.getpid()}.tmp"  # this test process is alive
    live.mkdir()
    (live / "other.onnx").write_bytes(b"partial")
    result = run(out, *WIDEN)
    assert result.returncode == 0, result.stderr
    assert live.is_dir() and (live / "other.onnx").read_bytes() == b"partial"


def test_failed_verification_writes_nothing(folder):
    """Exit 1 (not the same function): nothing written, no staging folder left."""
    out = folder / "out"
    result = run(out, *WIDEN, "--external-data", "yes", moment="mismatch")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing written" in result.stderr
    assert list(out.iterdir()) == []
