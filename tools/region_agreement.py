#!/usr/bin/env python
"""Does `--verify region` agree with `--verify full`? And does it catch a corrupted weight?

For each model given: widen every growable group 1.5x and deepen after every layer (unverified), then
verify each result against the original in both modes (an exact rewrite must pass both); then corrupt
three of the changed weights (first, middle, last: Gaussian noise of half the weight's standard
deviation, and separately its largest element moved by 1 + |value|) and verify again. Region mode must
fail whenever full mode fails (it may fail more often: its random boundary values reach states the
model's own inputs may not). A corruption both pass is invisible at the outputs on these inputs (an
embedding row no input id reads, a channel a ReLU keeps at zero, ...): reported, not judged.

Usage: python tools/region_agreement.py MODEL.onnx [...] [--json OUT]
(models: e.g. the exports of tools/check_zoo.py; see docs/bench.md for a run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

import onnx_net2net as n2n


def changed_weights(reference: onnx.ModelProto, grown: onnx.ModelProto) -> list[str]:
    """Float weights of rank >= 2 that the rewrite added or changed."""
    old = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    names = []
    for tensor in grown.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if value.dtype != np.float32 or value.ndim < 2:
            continue
        if tensor.name not in old or old[tensor.name].shape != value.shape or not np.array_equal(old[tensor.name], value):
            names.append(tensor.name)
    return names


def corrupted(model: onnx.ModelProto, name: str, how: str, rng) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for tensor in bad.graph.initializer:
        if tensor.name == name:
            value = numpy_helper.to_array(tensor).copy()
            if how == "noise":
                value += (0.5 * (value.std() + 1e-3) * rng.standard_normal(value.shape)).astype(value.dtype)
            else:
                index = int(np.argmax(np.abs(value)))
                value.flat[index] += 1 + abs(value.flat[index])
            tensor.CopyFrom(numpy_helper.from_array(value, name))
    return bad


def both_modes(reference, candidate) -> dict:
    result = {}
    for mode in ("region", "full"):
        start = time.perf_counter()
        try:
            report = n2n.verify(reference, candidate, mode=mode)
            result[mode] = {"passed": bool(report.passed), "max_rel": report.max_rel}
        except Exception as error:  # noqa: BLE001 - reported per row
            result[mode] = {"passed": None, "error": f"{type(error).__name__}: {str(error)[:160]}"}
        result[mode]["seconds"] = round(time.perf_counter() - start, 2)
    return result


def verdict(row: dict) -> str:
    region, full = row["region"]["passed"], row["full"]["passed"]
    if region is None or full is None:
        return "error"
    if row["corruption"] is None:
        return "exact: both pass" if region and full else "EXACT REWRITE FAILED"
    if full is False and region is not False:
        return "REGION PASSED WHAT FULL FAILED"
    return {(False, False): "both catch", (False, True): "only region catches"}.get((region, full), "neither catches")


def check(path: str, rng) -> list[dict]:
    reference = onnx.load(path)
    rows = []
    rewrites = {"widen 1.5x": lambda m: n2n.widen(m, factor=1.5, verify=False)[0],
                "deepen all": lambda m: n2n.deepen(m, "all", verify=False)[0]}
    for label, rewrite in rewrites.items():
        try:
            grown = rewrite(reference)
        except n2n.GrowthRefused as refusal:
            print(f"{path}: {label} refused: {refusal}", flush=True)
            continue
        cases = [(None, grown)]
        names = changed_weights(reference, grown)
        for name in sorted({names[0], names[len(names) // 2], names[-1]}) if names else []:
            cases += [(f"{how}:{name}", corrupted(grown, name, how, rng)) for how in ("noise", "element")]
        for corruption, candidate in cases:
            row = {"model": path, "rewrite": label, "corruption": corruption, **both_modes(reference, candidate)}
            row["verdict"] = verdict(row)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = [row for path in args.models for row in check(path, rng)]
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    counts = Counter(row["verdict"] for row in rows)
    print(f"{len(rows)} checks: " + ", ".join(f"{v} {k}" for k, v in counts.most_common()))
    bad = counts["REGION PASSED WHAT FULL FAILED"] + counts["EXACT REWRITE FAILED"] + counts["error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
