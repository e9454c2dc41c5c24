"""Chunks of a stream that feed one another hold one unit space once per chunk.

EdgeNeXt's split depthwise block cuts its stream into k equal chunks; chunk 0
goes through a depthwise convolution, whose output is added to chunk 1 before
the next one, and so on; the outputs and the last chunk are concatenated
back. The additions pair channel j of every chunk, so the stream holds c
units k times over ([S | S | ... ]). Growing the space grows every chunk,
and a chunk's convolution grows with the stream. EfficientViT's cascaded
attention adds chunks to heads' outputs v @ attn^T, whose rows are v's rows.
Unequal chunks hold no such space across all the chunks; the chunks that
pair grow as one space repeated, the others keep their width.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import H, inspected, make_model, node_weight, rand, widen_exact

import onnx_net2net as n2n


def _conv(name, x, y, inits, rng, c_out, c_in, k=1, group=1):
    inits[f"{name}_w"] = rand(rng, c_out, c_in // group, k, k)
    inits[f"{name}_b"] = rand(rng, c_out)
    return H("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, pads=[k // 2] * 4, group=group)


def _chunks(source, sizes, inits, how):
    """The stream cut into chunks along the channels, by Slices or by one Split."""
    names = [f"chunk{i}" for i in range(len(sizes))]
    if how == "split":
        inits["split_sizes"] = np.array(sizes, np.int64)
        return names, [H("Split", [source, "split_sizes"], names, name="split", axis=1)]
    nodes, start = [], 0
    for i, size in enumerate(sizes):
        inits[f"start{i}"], inits[f"end{i}"] = np.array([start], np.int64), np.array([start + size], np.int64)
        nodes.append(H("Slice", [source, f"start{i}", f"end{i}", "axes"], [names[i]], name=f"slice{i}"))
        start += size
    inits["axes"] = np.array([1], np.int64)
    return names, nodes


def cascade(chunks: int = 2, width: int = 3, how: str = "slice", sizes=None, gather: bool = False):
    """stem -> stream S; chunks of S cascade through depthwise convs; concat
    + pos(x) -> relu -> mix -> + S -> head. `pos` reaches S only through the
    chunks (EdgeNeXt's positional encoding after the concat)."""
    rng = np.random.default_rng(0)
    sizes = sizes or [width] * chunks
    c, total, inits = sizes[0], sum(sizes), {}
    nodes = [_conv("stem", "x", "s0", inits, rng, total, 2, k=3), H("Relu", ["s0"], ["s"])]
    names, cut = _chunks("s", sizes, inits, how)
    nodes += cut
    outs, previous = [], names[0]
    for i in range(len(sizes) - 1):
        if i:
            nodes.append(H("Add", [outs[-1], names[i]], [f"sum{i}"]))
            previous = f"sum{i}"
        nodes.append(_conv(f"dw{i}", previous, f"dw{i}_out", inits, rng, c, c, k=3, group=c))
        outs.append(f"dw{i}_out")
    nodes += [H("Concat", outs + [names[-1]], ["cat"], axis=1),
              _conv("pos", "x", "pos_out", inits, rng, total, 2),
              H("Add", ["cat", "pos_out"], ["t"]), H("Relu", ["t"], ["tr"]),
              _conv("mix", "tr", "m", inits, rng, total, total), H("Add", ["s", "m"], ["stream"])]
    if gather:  # dynamo's as_strided after a global pool: [1, C, 1, 1] -> [C] -> Gather(arange) -> [1, C, 1, 1]
        inits["flat"] = np.array([total], np.int64)
        inits["positions"] = np.arange(total, dtype=np.int64).reshape(1, total, 1, 1)
        nodes += [H("GlobalAveragePool", ["stream"], ["pool"]), H("Reshape", ["pool", "flat"], ["pool_flat"]),
                  H("Gather", ["pool_flat", "positions"], ["pooled"], axis=0), _conv("head", "pooled", "y", inits,
                                                                                  rng, 3, total)]
    else:
        nodes.append(_conv("head", "stream", "y", inits, rng, 3, total))
    batch = 1 if gather else "N"
    return make_model(nodes, [("x", [batch, 2, 5, 5])], ["y"], inits)


@pytest.mark.parametrize("how", ["slice", "split"])
@pytest.mark.parametrize("chunks", [2, 4])
def test_the_stream_grows_in_every_chunk(how, chunks):
    model = cascade(chunks, how=how)
    layers = inspected(model)
    assert layers["stem"]["widen"]["ok"], layers["stem"]["widen"]["reason"]
    assert layers["stem"]["widen"]["step"] == chunks  # one unit added to every chunk
    wider, _ = widen_exact(model, {"stem": 3 * chunks + 2 * chunks})
    onnx.checker.check_model(wider, full_check=True)
    assert node_weight(wider, "stem").shape[0] == 5 * chunks
    assert node_weight(wider, "dw0").shape[0] == 5
    assert node_weight(wider, "head", 1).shape[1] == 5 * chunks


@pytest.mark.parametrize("how", ["slice", "split"])
def test_a_chunk_convolution_grows_with_its_stream(how):
    model = cascade(4, how=how)
    entry = inspected(model)["dw1"]
    assert entry["widen"]["ok"], entry["widen"]["reason"]
    assert entry["width"] == 3
    assert "passes one repeat of the units 'stem' writes" in entry["widen"]["note"]
    wider, _ = widen_exact(model, {"dw1": 5})
    assert node_weight(wider, "dw1").shape[0] == 5 and node_weight(wider, "stem").shape[0] == 20
    assert inspected(wider)["dw1"]["width"] == 5


@pytest.mark.parametrize("how", ["slice", "split"])
def test_a_space_reached_only_through_the_chunks(how):
    """pos writes the concatenation; the stream is reached back through the chunks alone."""
    model = cascade(2, how=how)
    wider, _ = widen_exact(model, {"pos": 8})
    assert node_weight(wider, "stem").shape[0] == 8


def test_an_identity_gather_over_the_repeated_stream():
    model = cascade(2, gather=True)
    assert inspected(model)["stem"]["widen"]["ok"]
    wider, _ = widen_exact(model, {"stem": 10})
    assert node_weight(wider, "head", 1).shape[1] == 10


@pytest.mark.parametrize("how", ["slice", "split"])
def test_unequal_chunks_grow_in_the_chunks_that_pair(how):
    """3 + 3 + 2 channels: the first two chunks pair their channels, the last
    does not: the pair holds one space twice ([S | S | 2 others]), which
    grows, cut by a Split or by Slices; the last chunk keeps its width."""
    model = cascade(sizes=[3, 3, 2], how=how)
    assert inspected(model)["stem"]["widen"]["ok"]
    wider, _ = widen_exact(model, {"stem": 12})
    assert node_weight(wider, "stem").shape[0] == 12
    assert node_weight(wider, "dw0").shape[0] == 5 and node_weight(wider, "dw1").shape[0] == 5


def cascaded_attention():
    """EfficientViT's head: v = x Wv viewed [N, d, T]; attn = softmax(x Wa) [N, T, T];
    o = v @ attn^T keeps v's rows (the units); o^T Wo reads them."""
    rng = np.random.default_rng(1)
    inits = {"wv": rand(rng, 4, 3), "wa": rand(rng, 4, 5), "wo": rand(rng, 3, 2)}
    nodes = [H("MatMul", ["x", "wv"], ["v"], name="v_proj"), H("Transpose", ["v"], ["vt"], perm=[0, 2, 1]),
             H("MatMul", ["x", "wa"], ["logits"], name="attn_proj"), H("Softmax", ["logits"], ["attn"], axis=-1),
             H("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1]),
             H("MatMul", ["vt", "attn_t"], ["o"]), H("Transpose", ["o"], ["ot"], perm=[0, 2, 1]),
             H("MatMul", ["ot", "wo"], ["y"], name="out_proj")]
    return make_model(nodes, [("x", ["N", 5, 4])], ["y"], inits)


def test_units_on_the_rows_of_a_product_of_computed_tensors():
    model = cascaded_attention()
    layers = inspected(model)
    assert layers["v_proj"]["widen"]["ok"], layers["v_proj"]["widen"]["reason"]
    wider, _ = widen_exact(model, {"v_proj": 5})
    assert node_weight(wider, "out_proj").shape[0] == 5
    # attn's units are the keys it normalises over: still refused.
    assert not layers["attn_proj"]["widen"]["ok"]


def test_widths_for_one_group_are_compared_in_units():
    """dw0 holds the stream's units once, stem four times: 5 and 20 ask for the same growth."""
    model = cascade(4)
    wider, _ = widen_exact(model, {"dw0": 5, "stem": 20})
    assert node_weight(wider, "dw0").shape[0] == 5
    with pytest.raises(n2n.UserError, match="same number of units"):
        n2n.widen(model, {"dw0": 5, "stem": 16})
