"""Does `align` pay off? onnxruntime inference time before and after alignment.

Builds a CNN with awkward widths (30, 60, 100 channels; a 100 -> 250 -> 10
head), aligns it to multiples of 8/16/32 with both fills, checks each aligned
model is exact, and times onnxruntime inference (default graph optimisations,
as deployed) on CPU, and on CUDA when a GPU is usable. Each configuration is
timed in the same process, interleaved over several rounds, median reported.

    python tools/bench_align.py [--batch 8] [--size 56] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_net2net.passes import AlignPass
from onnx_net2net.verification import choose_providers, verify_models


def awkward_cnn(size: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    widths = [3, 30, 60, 100]
    nodes, inits, x = [], {}, "x"
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        inits[f"w{i}"] = rng.standard_normal((cout, cin, 3, 3)) * (2 / (9 * cin)) ** 0.5
        inits[f"b{i}"] = np.zeros(cout)
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    inits.update(wf=rng.standard_normal((100, 250)) * 0.1, bf=np.zeros(250), wo=rng.standard_normal((250, 10)) * 0.1,
                 bo=np.zeros(10))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "wf", "bf"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["hr"]),
              helper.make_node("Gemm", ["hr", "wo", "bo"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "awkward", [helper.make_tensor_value_info("x", 1, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", 1, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def session(model: onnx.ModelProto, provider: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="inferences per round")
    parser.add_argument("--json")
    args = parser.parse_args()
    base = awkward_cnn(args.size)
    variants = {"awkward (30/60/100/250)": base}
    for multiple in (8, 16, 32):
        for fill in ("zero", "replicate"):
            aligned = AlignPass(multiple, fill)(base).model
            assert verify_models(base, aligned).passed, (multiple, fill)
            variants[f"align {multiple} ({fill})"] = aligned
    feed = {"x": np.random.default_rng(1).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)}
    results = {}
    for provider in choose_providers(None)[:1] + (["CPUExecutionProvider"] if choose_providers(None)[0] != "CPUExecutionProvider" else []):
        sessions = {name: session(model, provider) for name, model in variants.items()}
        times = {name: [] for name in sessions}
        for name, sess in sessions.items():
            sess.run(None, feed)  # warm-up
        for _ in range(args.rounds):
            for name, sess in sessions.items():
                start = time.perf_counter()
                for _ in range(args.runs):
                    sess.run(None, feed)
                times[name].append((time.perf_counter() - start) / args.runs * 1000)
        baseline = statistics.median(times["awkward (30/60/100/250)"])
        print(f"\n{provider}, batch {args.batch}, {args.size}x{args.size}: median ms per inference")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:28} {median:8.2f} ms   x{median / baseline:.2f}")
            results[f"{provider}/{name}"] = {"median_ms": median, "ratio": median / baseline, "all_ms": values}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
