"""tools/check_zoo.py's float32 floor: how far one ulp on every weight moves a model's output."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import H, make_model, mlp_model, rand, tool_module
from onnx import numpy_helper

from onnx_net2net.verification import ReferenceRun


def _check_zoo():
    return tool_module("check_zoo")


def test_the_floor_is_the_move_of_one_ulp_on_the_weights():
    model = mlp_model(6, 8, 3)
    floor = _check_zoo().float_floor(ReferenceRun(model), model)
    assert 0 < floor < 1e-5


def test_constants_that_are_not_weights_keep_their_values():
    """A float constant outside Conv/Gemm/MatMul (a scale, a size) is not moved: the floor is 0."""
    rng = np.random.default_rng(0)
    model = make_model([H("Mul", ["x", "scale"], ["y"])], [("x", ["N", 4])], ["y"], {"scale": rand(rng, 4)})
    assert _check_zoo().float_floor(ReferenceRun(model), model) == 0


def test_the_float64_judge_sees_the_rewrite_not_float32_arithmetic():
    import onnx_net2net as n2n

    model = mlp_model(6, 8, 3)
    judge = _check_zoo().Float64Judge(ReferenceRun(model), model)
    wider, _ = n2n.widen(model, {"fc1": 12})
    assert judge.error(wider, "widen") < 1e-6
    broken = onnx.ModelProto()
    broken.CopyFrom(wider)
    weight = numpy_helper.to_array(wider.graph.initializer[0]) * 1.01
    broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, wider.graph.initializer[0].name))
    assert judge.error(broken, "broken") > 1e-4
    assert len(judge.rechecks) == 2
