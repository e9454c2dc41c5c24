"""Block-by-block region verification (onnx_net2net.region_blocks): a region
that spans the whole model (a widened residual stream) runs in pieces; the
verdict must be the whole region's, corruption anywhere must fail, each
piece's session must hold only its own weights, and the cut tensors must show
the stream's expansion map (tiling, LEMON's mean units)."""

import numpy as np
import onnx
import pytest

import onnx_net2net as n2n
from onnx_net2net import io, region, region_blocks
from helpers import H, make_model, model_path, rand
from test_region import corrupted, save_external

STREAMS = [
    ("vit_tiny", "/model/embeddings/patch_embeddings/projection/Conv", 90),    # LEMON: 26 mean units
    ("vit_tiny", "/model/embeddings/patch_embeddings/projection/Conv", 128),   # tiling
    ("gpt2_tiny", "/model/transformer/h.0/attn/c_proj/Gemm", 80),
    ("bert_tiny", "/model/bert/encoder/layer.0/attention/output/dense/MatMul", 128),
    ("resnet_block", "/stem/stem.0/Conv", 24),
]


def widened(name, layer, width):
    path = str(model_path(name))
    new, _ = n2n.widen(path, {layer: width}, verify=False)
    return path, new


def small_blocks(old, new, parts=4):
    """A block budget that cuts this region into a few pieces."""
    return max(1, region.find_region(old, new).old_weight_bytes // parts)


@pytest.mark.parametrize("name,layer,width", STREAMS)
def test_blocks_agree_with_the_whole_region(name, layer, width):
    path, new = widened(name, layer, width)
    old_h, new_h = io.load(path), io.from_proto(new)
    blocks = region_blocks.plan_blocks(old_h, new_h, region.find_region(old_h, new_h), small_blocks(old_h, new_h))
    assert len(blocks) > 1
    report = region.verify_region(old_h, new_h, block_bytes=small_blocks(old_h, new_h))
    whole = region.verify_region(old_h, new_h, block_bytes=1 << 40)
    assert report.passed and whole.passed, report.summary()
    assert [o.name for o in report.outputs] == [o.name for o in whole.outputs]
    assert np.isclose(report.max_abs, whole.max_abs, rtol=1e-3, atol=1e-9)
    note = next(n for n in report.notes if n.startswith("region verified block by block"))
    assert f"tiling {64 if name != 'resnet_block' else 16} -> {width}" in note, note
    if (name, width) == ("vit_tiny", 90):
        assert f"+ {90 - 64} mean unit(s)" in note, note


@pytest.mark.parametrize("name,layer,width", STREAMS[1:4])
def test_blocks_catch_a_corrupted_weight_in_any_block(name, layer, width):
    """Corrupt weights read in different blocks: every corruption full verification sees, the blocks see."""
    path, new = widened(name, layer, width)
    old_h, new_h = io.load(path), io.from_proto(new)
    found = region.find_region(old_h, new_h)
    blocks = region_blocks.plan_blocks(old_h, new_h, found, small_blocks(old_h, new_h))
    block_of = {}
    for number, block in enumerate(blocks):
        for index in block.new_nodes:
            for tensor in new.graph.node[index].input:
                block_of.setdefault(tensor, number)
    floats = [t.name for t in new.graph.initializer if t.name in found.changed_weights
              and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    caught = set()
    for weight in floats:
        if block_of[weight] in caught:
            continue
        bad = corrupted(new, weight)
        if n2n.verify(path, bad).passed:
            continue  # a corruption the function does not see
        bad_h = io.from_proto(bad)
        report = region.verify_region(io.load(path), bad_h, block_bytes=small_blocks(old_h, bad_h))
        assert not report.passed, weight
        assert any("block by block" in n for n in report.notes)
        caught.add(block_of[weight])
    assert len(caught) >= 2, caught


def residual_mlp(blocks=6, width=32):
    """x -> proj -> (stream + W2 relu(W1 stream)) x blocks -> head: every block reads and writes the stream."""
    rng = np.random.default_rng(3)
    inits = {"P": rand(rng, 8, width), "O": rand(rng, width, 4)}
    nodes, stream = [H("MatMul", ["x", "P"], ["s0"], name="proj")], "s0"
    for k in range(blocks):
        inits[f"A{k}"], inits[f"B{k}"] = rand(rng, width, 2 * width), rand(rng, 2 * width, width, scale=0.2)
        nodes += [H("MatMul", [stream, f"A{k}"], [f"u{k}"], name=f"up{k}"), H("Relu", [f"u{k}"], [f"r{k}"]),
                  H("MatMul", [f"r{k}", f"B{k}"], [f"d{k}"], name=f"down{k}"),
                  H("Add", [stream, f"d{k}"], [f"s{k + 1}"])]
        stream = f"s{k + 1}"
    nodes.append(H("MatMul", [stream, "O"], ["y"], name="head"))
    return make_model(nodes, [("x", ["N", 8])], [("y", ["N", 4])], inits)


def test_each_block_session_holds_only_its_own_weights(tmp_path, monkeypatch):
    model = residual_mlp()
    new, _ = n2n.widen(model, {"proj": 48}, verify=False)
    save_external(model, tmp_path / "a.onnx")
    save_external(new, tmp_path / "b.onnx")
    old_h, new_h = io.load(tmp_path / "a.onnx", lazy=True), io.load(tmp_path / "b.onnx", lazy=True)
    found = region.find_region(old_h, new_h)
    assert len(found.old_nodes) == len(old_h.graph.node)          # the stream spans the whole model
    sessions = []
    original = region_blocks.make_session

    def recording(model, *args, **kwargs):
        sessions.append({t.name: io.tensor_nbytes(t) for t in model.graph.initializer})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(region_blocks, "make_session", recording)
    budget = found.new_weight_bytes // 6
    report = region.verify_region(old_h, new_h, block_bytes=budget)
    assert report.passed, report.summary()
    assert len(sessions) >= 8                                      # reference and candidate, 4+ blocks each
    assert max(sum(s.values()) for s in sessions) < found.new_weight_bytes / 2
    assert set().union(*sessions) == {t.name for t in model.graph.initializer}
    note = next(n for n in report.notes if "block by block" in n)
    assert "tiling 32 -> 48" in note


def test_cli_verify_region_runs_block_by_block(tmp_path, monkeypatch, capsys):
    model = residual_mlp()
    new, _ = n2n.widen(model, {"proj": 48}, verify=False)
    onnx.save(model, str(tmp_path / "a.onnx"))
    onnx.save(new, str(tmp_path / "b.onnx"))
    onnx.save(corrupted(new, "B4"), str(tmp_path / "c.onnx"))
    monkeypatch.setattr(region_blocks, "BLOCK_WEIGHT_BYTES", 4096)
    from onnx_net2net import cli

    assert cli.main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--verify", "region"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "block by block" in out
    assert cli.main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "c.onnx"), "--verify", "region"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_expansion_maps_are_named():
    rng = np.random.default_rng(0)
    old = rng.standard_normal((5, 7, 4)).astype(np.float32)
    tiled = old[..., [0, 1, 2, 3, 1, 0]]
    lemon = np.concatenate([old, old.mean(axis=-1, keepdims=True)], axis=-1)
    zeros = np.concatenate([old, np.zeros_like(old[..., :2])], axis=-1)
    channels = np.concatenate([old, old[:, [6, 2]]], axis=1)
    assert region_blocks.describe_expansion(old, tiled) == "tiling 4 -> 6"
    assert region_blocks.describe_expansion(old, lemon) == "tiling 4 -> 5 + 1 mean unit(s)"
    assert region_blocks.describe_expansion(old, zeros) == "tiling 4 -> 6 + 2 zero unit(s)"
    assert region_blocks.describe_expansion(old, channels) == "tiling 7 -> 9"
    assert region_blocks.describe_expansion(old, old.copy()) == "identity (same width)"
    assert region_blocks.describe_expansion(old, old + 1) == "same width, other values"
    scrambled = tiled.copy()
    scrambled[..., 5] += 0.5
    assert region_blocks.describe_expansion(old, scrambled).startswith("not a tiling or LEMON expansion (new unit 5")
    assert "only 3 old units kept" in region_blocks.describe_expansion(old, old[..., [0, 1, 2, 2, 1]])


def test_a_tiling_of_values_with_many_ties_is_named():
    # After a Relu many units share the value 0 in any one row: candidates
    # taken from a single row missed copies whose source was 3+ ties away.
    rng = np.random.default_rng(0)
    old = np.maximum(rng.standard_normal((4, 16, 32)), 0).astype(np.float32)
    mapping = np.concatenate([np.arange(32), rng.integers(0, 32, 16)])
    assert region_blocks.describe_expansion(old, old[..., mapping]) == "tiling 32 -> 48"


def test_a_deepened_stream_still_runs_in_blocks():
    # Deepening after `proj` renames the stream the first block starts from,
    # so the first cut misses it and the second block fails: the second
    # block's end was blamed (and dropped for good), then the next, until the
    # region ran in one piece.
    model = residual_mlp()
    new, _ = n2n.deepen(model, "all", verify=False)
    old_h, new_h = io.from_proto(model), io.from_proto(new)
    found = region.find_region(old_h, new_h)
    budget = found.old_weight_bytes // 12
    assert len(region_blocks.plan_blocks(old_h, new_h, found, budget)) >= 6
    assert region.verify_region(old_h, new_h, block_bytes=budget).passed
    bad = corrupted(new, "B3")
    assert not region.verify_region(old_h, io.from_proto(bad), block_bytes=budget).passed
