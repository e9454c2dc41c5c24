"""Swin's patch merging: four strided slices of a channels-last map
concatenated along channels (the stage's units four times in one tensor), a
LayerNorm over 4C and a Linear 4C -> 2C. Widening the stage by a multiple of
its width is exact (every unit copied equally often in every block); other
widths are refused, and so is a concatenation of two different tensors."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_net2net as n2n

from helpers import H, inspected_widen, make_model, rand, widen_exact

C = 4


def patch_merging(same_source: bool = True):
    rng = np.random.default_rng(0)
    inits = {"w0": rand(rng, 3, C), "w0b": rand(rng, 3, C), "g": rand(rng, 4 * C) + 1, "b": rand(rng, 4 * C),
             "w_red": rand(rng, 4 * C, 2 * C), "w_head": rand(rng, 2 * C, 2), "axes": np.array([1, 2], np.int64),
             "steps": np.array([2, 2], np.int64), "end": np.array([4, 4], np.int64)}
    nodes = [H("MatMul", ["x", "w0"], ["h"], name="embed"), H("MatMul", ["x", "w0b"], ["hb"], name="other")]
    pieces = []
    for k, (i, j) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        inits[f"start{k}"] = np.array([i, j], np.int64)
        source = "h" if same_source or k % 2 == 0 else "hb"
        nodes.append(H("Slice", [source, f"start{k}", "end", "axes", "steps"], [f"p{k}"]))
        pieces.append(f"p{k}")
    nodes += [H("Concat", pieces, ["merged"], axis=-1),
              H("LayerNormalization", ["merged", "g", "b"], ["normed"], axis=-1),
              H("MatMul", ["normed", "w_red"], ["reduced"], name="reduction"), H("Relu", ["reduced"], ["a"]),
              H("MatMul", ["a", "w_head"], ["y"], name="head")]
    return make_model(nodes, [("x", ["N", 4, 4, 3])], ["y"], inits)


def test_the_stage_widens_by_multiples_through_patch_merging():
    widen = inspected_widen(patch_merging(), "embed")
    assert widen["ok"], widen["reason"]
    assert widen["step"] == C
    grown, _ = widen_exact(patch_merging(), {"embed": 2 * C})
    reduction = next(i for i in grown.graph.initializer if i.name.startswith("w_red"))
    assert list(reduction.dims) == [8 * C, 2 * C]
    widen_exact(patch_merging(), {"embed": 3 * C})


def test_a_width_that_copies_units_unequally_is_refused():
    with pytest.raises(n2n.UserError, match="multiple of 4"):
        n2n.widen(patch_merging(), {"embed": C + 2})


def test_slices_of_two_different_tensors_are_not_one_space():
    """h's slices hold embed's units at two offsets of the concatenation, hb's other data
    between them: the norm over all of it is refused."""
    widen = inspected_widen(patch_merging(same_source=False), "embed")
    assert not widen["ok"] and "LayerNormalization" in widen["reason"]
    assert "uneven offsets" in widen["reason"]
