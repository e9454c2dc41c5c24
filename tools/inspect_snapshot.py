"""Snapshot `inspect --json` for every model in some folders, and diff two snapshots.

A refactoring of the analysis must not change what `inspect` promises or
refuses (nor the reasons it gives). Take a snapshot before the change and one
after, then diff them:

    python tools/inspect_snapshot.py models /tmp/zoo -o before.json
    python tools/inspect_snapshot.py models /tmp/zoo -o after.json
    python tools/inspect_snapshot.py --diff before.json after.json

A snapshot maps each model (by its path as given) to its `inspect` report,
or to `{"error": ...}` when inspecting it raised. `--no-trial` skips the
trial rewrites (static analysis only, much faster). `--diff` prints the
models that differ, and the first differing layers, and exits 1 if any do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def snapshot(folders: list[str], trial: bool | None) -> dict[str, dict]:
    """`inspect`'s report for every *.onnx file in `folders` (sorted by path)."""
    from onnx_net2net.inspection import inspect_model
    from onnx_net2net.io import load

    reports = {}
    for path in sorted(p for folder in folders for p in Path(folder).glob("*.onnx")):
        started = time.time()
        try:
            reports[str(path)] = inspect_model(load(str(path)), trial=trial, name=str(path))
        except Exception as error:  # noqa: BLE001 - a failure is part of the behaviour under test
            reports[str(path)] = {"error": f"{type(error).__name__}: {error}"}
        print(f"{path}: {time.time() - started:.1f}s", file=sys.stderr, flush=True)
    return reports


def diff(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """One line per model that differs (or is only in one snapshot)."""
    lines = []
    for model in sorted(set(before) | set(after)):
        if model not in before or model not in after:
            lines.append(f"{model}: only in {'the second' if model in after else 'the first'} snapshot")
        elif before[model] != after[model]:
            lines.append(f"{model}: {first_difference(before[model], after[model])}")
    return lines


def first_difference(a: dict, b: dict) -> str:
    """The first layer (or top-level key) whose report differs."""
    layers_a, layers_b = a.get("layers", []), b.get("layers", [])
    for layer_a, layer_b in zip(layers_a, layers_b):
        if layer_a != layer_b:
            return f"layer {layer_a.get('name')}: {json.dumps(layer_a)} != {json.dumps(layer_b)}"
    if len(layers_a) != len(layers_b):
        return f"{len(layers_a)} layers != {len(layers_b)}"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return f"keys differ: {', '.join(keys)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", help="folders whose *.onnx models are inspected")
    parser.add_argument("-o", "--output", help="write the snapshot here (default: stdout)")
    parser.add_argument("--no-trial", action="store_true", help="static analysis only (no trial rewrites)")
    parser.add_argument("--diff", nargs=2, metavar=("A", "B"), help="compare two snapshots")
    args = parser.parse_args()
    if args.diff:
        before, after = (json.loads(Path(p).read_text()) for p in args.diff)
        lines = diff(before, after)
        print("\n".join(lines + [f"{len(lines)} of {len(set(before) | set(after))} models differ"]))
        return 1 if lines else 0
    if not args.folders:
        parser.error("give folders to snapshot, or --diff A B")
    text = json.dumps(snapshot(args.folders, False if args.no_trial else None), indent=1, sort_keys=True)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
