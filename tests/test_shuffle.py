"""Channel shuffles (ShuffleNetV2 stages) built with onnx.helper: the stage's
branch layers grow together as one routing region (onnx_net2net.analysis.routing)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnx_net2net as n2n
from onnx_net2net import analysis, io
from onnx_net2net.analysis import Refusal, RefusalKind
from onnx_net2net.analysis.routing import find_routed_group
from onnx_net2net.analysis.routing_simulation import simulate, simulate_alone, simulate_many
from onnx_net2net.ir import GraphIR

from helpers import H, init, make_model, node, rand, widen_exact

C_IN, SIDE, H_WIDTH = 3, 4, 4


def shuffle_stage(blocks: int, split: str = "sizes", seed: int = 0, h: int = H_WIDTH):
    """block 1: concat(relu(conv a(x)), relu(conv b(x))); blocks 2..: split the
    shuffled tensor in halves, keep one, convolve the other; every block ends
    with Reshape [1, 2, h, S, S] -> Transpose -> Reshape. Then a depthwise conv
    and BatchNormalization on the stage output, read by a 1x1 conv."""
    rng = np.random.default_rng(seed)
    inits, nodes = {}, []
    inits.update(to5=np.array([1, 2, h, SIDE, SIDE], np.int64), to4=np.array([1, 2 * h, SIDE, SIDE], np.int64))

    def conv(name, source, c_in, c_out):
        inits[f"{name}_w"], inits[f"{name}_b"] = rand(rng, c_out, c_in, 1, 1), rand(rng, c_out)
        nodes.extend([H("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_c"], name=name),
                      H("Relu", [f"{name}_c"], [f"{name}_r"])])
        return f"{name}_r"

    def shuffle(left, right, k):
        nodes.extend([H("Concat", [left, right], [f"cat{k}"], axis=1),
                      H("Reshape", [f"cat{k}", "to5"], [f"r5_{k}"]),
                      H("Transpose", [f"r5_{k}"], [f"t{k}"], perm=[0, 2, 1, 3, 4]),
                      H("Reshape", [f"t{k}", "to4"], [f"out{k}"])])
        return f"out{k}"

    out = shuffle(conv("a", "x", C_IN, h), conv("b", "x", C_IN, h), 1)
    for k in range(2, blocks + 1):
        halves = [f"keep{k}", f"pass{k}"]
        if split == "sizes":
            inits["halves"] = np.array([h, h], np.int64)
            nodes.append(H("Split", [out, "halves"], halves, axis=1))
        elif split == "num_outputs":
            nodes.append(H("Split", [out], halves, axis=1, num_outputs=2))
        else:
            inits.update(zero=np.array([0], np.int64), mid=np.array([h], np.int64),
                         end=np.array([2 * h], np.int64), one=np.array([1], np.int64))
            nodes += [H("Slice", [out, "zero", "mid", "one"], [halves[0]]),
                      H("Slice", [out, "mid", "end", "one"], [halves[1]])]
        out = shuffle(halves[0], conv(f"branch{k}", halves[1], h, h), k)
    inits.update(dw_w=rand(rng, 2 * h, 1, 3, 3), dw_b=rand(rng, 2 * h), bn_s=(1 + rand(rng, 2 * h, scale=0.2)),
                 bn_b=rand(rng, 2 * h), bn_m=rand(rng, 2 * h), bn_v=(1 + rng.random(2 * h)).astype(np.float32),
                 head_w=rand(rng, 3, 2 * h, 1, 1))
    nodes += [H("Conv", [out, "dw_w", "dw_b"], ["dw"], name="dw", group=2 * h, pads=[1, 1, 1, 1]),
              H("BatchNormalization", ["dw", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
              H("Conv", ["bn", "head_w"], ["y"], name="head")]
    opset = 18 if split == "num_outputs" else 17
    return make_model(nodes, [("x", [1, C_IN, SIDE, SIDE])], [("y", [1, 3, SIDE, SIDE])], inits, opset=opset)


def _group(model, layer: str):
    ir = GraphIR(io.ModelHandle(proto=model))
    return ir, analysis.find_group(ir, analysis.find_layer(ir, layer))


@pytest.mark.parametrize("split", ["sizes", "num_outputs", "slices"])
def test_the_stage_is_one_routing_region(split):
    model = shuffle_stage(3, split)
    layers = {l["name"]: l for l in n2n.inspect(model, trial=False)["layers"]}
    writers = {"a", "b", "branch2", "branch3"}
    for name in writers | {"dw"}:
        assert layers[name]["widen"]["ok"], layers[name]["widen"]["reason"]
        assert set(layers[name]["widen"]["group"]) == writers | {"dw"}
        assert "channel routing region" in layers[name]["widen"]["note"]
    assert not layers["head"]["widen"]["ok"]  # its output is the graph output


@pytest.mark.parametrize("split", ["sizes", "num_outputs", "slices"])
@pytest.mark.parametrize("blocks", [2, 3])
def test_every_routable_width_is_exact(split, blocks):
    model = shuffle_stage(blocks, split)
    ir, group = _group(model, "a")
    assert isinstance(group, analysis.RoutedGroup)
    valid = analysis.valid_widths(ir, group)
    assert valid, "some width must route"
    for width in valid:
        grown, _ = widen_exact(model, {"branch2": width}, split="random", seed=width)
        assert init(grown, node(grown, "a").input[1]).shape[0] == width
        assert init(grown, node(grown, "head").input[1]).shape[1] == 2 * width
        assert init(grown, "to5").tolist() == [1, 2, width, SIDE, SIDE]
        assert next(a.i for a in node(grown, "dw").attribute if a.name == "group") == 2 * width


def test_a_width_that_cannot_route_is_refused_with_the_ones_that_can():
    model = shuffle_stage(5)
    ir, group = _group(model, "a")
    valid = analysis.valid_widths(ir, group)
    invalid = [w for w in range(H_WIDTH + 1, 2 * H_WIDTH + 1) if w not in valid]
    assert invalid, "a deep stage with 4 channels per branch does not route every width"
    with pytest.raises(n2n.UserError, match=f"width {invalid[0]} would change where they go.*widths that route"):
        n2n.widen(model, {"a": invalid[0]})
    widen_exact(model, {"a": valid[0]})


def test_the_promised_step_routes():
    for blocks in (2, 3, 5):
        model = shuffle_stage(blocks)
        layer = {l["name"]: l for l in n2n.inspect(model, trial=False)["layers"]}["branch2"]
        widen_exact(model, {"branch2": layer["width"] + layer["widen"]["step"]})


def test_align_and_zero_init_keep_the_old_weights():
    model = shuffle_stage(2)
    grown, report = n2n.widen(model, {"a": 6}, init="zero")
    assert report["verification"]["passed"]
    head_old, head_new = init(model, "head_w"), init(grown, "head_w")
    assert np.count_nonzero(head_new) == np.count_nonzero(head_old)  # new slots are read with weight 0


def test_a_shuffle_that_cannot_route_says_why_both_ways():
    """The walk refuses the shuffle, the routing region is tried and refused
    too: the message gives both reasons, the refusal both kinds."""
    model = shuffle_stage(1)
    model.graph.node.append(helper.make_node("Softmax", ["out1"], ["s"], axis=1))
    model.graph.output.append(helper.make_tensor_value_info("s", 1, [1, 2 * H_WIDTH, SIDE, SIDE]))
    _, group = _group(model, "a")
    assert not group.ok and str(group.refusal).startswith("Reshape Reshape#")
    assert "a channel shuffle (Reshape -> Transpose -> Reshape)" in str(group.refusal)
    assert str(group.refusal).endswith("; as a routing region: Softmax reads the region")
    assert group.refusal.has_kind(RefusalKind.CHANNEL_SHUFFLE) and group.refusal.op == "Reshape"
    assert group.refusal.causes[-1].kind == RefusalKind.NOT_ROUTABLE  # after the structured layouts tried


def test_noise_is_refused_on_a_shuffle_stage():
    with pytest.raises(n2n.UserError, match="exactly only"):
        n2n.widen(shuffle_stage(2), {"a": 6}, noise=0.1)


def test_zero_sum_split_is_exact_on_a_shuffle_stage():
    model = shuffle_stage(2)
    equal, _ = widen_exact(model, {"a": 6}, split="equal", seed=4)
    zero_sum, report = widen_exact(model, {"a": 6}, split="zero-sum", seed=4)
    assert report["exact"] is True
    differing = [t.name for t in equal.graph.initializer
                 if not np.allclose(init(equal, t.name), init(zero_sum, t.name), rtol=0, atol=1e-6)]
    assert differing   # the readers' weights of the copies differ from the equal split


@pytest.mark.parametrize("seed", range(6))
def test_random_stages_grow_exactly_at_the_widths_that_route(seed):
    rng = np.random.default_rng(seed)
    blocks, h = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    split = str(rng.choice(["sizes", "num_outputs", "slices"]))
    model = shuffle_stage(blocks, split, seed=seed, h=h)
    ir, group = _group(model, "a")
    valid = analysis.valid_widths(ir, group)
    for width in rng.choice(valid, size=min(3, len(valid)), replace=False):
        widen_exact(model, {f"branch{blocks}": int(width)},
                    split=str(rng.choice(["equal", "random"])), seed=seed)
    for width in [w for w in range(h + 1, 2 * h + 1) if w not in valid][:2]:
        with pytest.raises(n2n.UserError, match="would change where they go"):
            n2n.widen(model, {"a": width})


def _same_routing(found, alone) -> bool:
    if isinstance(alone, Refusal) or isinstance(found, Refusal):
        return isinstance(found, Refusal) and isinstance(alone, Refusal) and str(found) == str(alone)
    return found.labels.keys() == alone.labels.keys() and all(
        np.array_equal(found.labels[name], alone.labels[name]) for name in alone.labels)


def _alone(ir, region, width):
    try:
        return simulate_alone(ir, region, width)
    except Refusal as refused:
        return refused


@pytest.mark.parametrize("split", ["sizes", "num_outputs", "slices"])
def test_one_session_routes_every_width_as_a_model_of_its_own(split):
    """The shared simulation (width-dependent constants fed as inputs) gives
    every width the routing, or the refusal, of that width's own model."""
    ir, group = _group(shuffle_stage(5, split), "a")
    widths = list(range(H_WIDTH + 1, 3 * H_WIDTH + 1))
    shared = simulate_many(ir, group.region, widths)
    for width in widths:
        assert _same_routing(shared[width], _alone(ir, group.region, width)), width


def test_kept_routings_follow_the_model():
    """Routings are kept across indexes, keyed by the simulation model and
    its feeds: another transpose (model bytes) or another reshape target
    (a fed constant) in the same region is simulated again."""
    width = 2 * H_WIDTH
    ir, group = _group(shuffle_stage(2), "a")
    original = simulate(ir, group.region, width)
    other_perm, other_target = shuffle_stage(2), shuffle_stage(2)
    for n in other_perm.graph.node:
        if n.op_type == "Transpose":
            n.attribute[0].ints[:] = [0, 1, 2, 3, 4]
    target = next(t for t in other_target.graph.initializer if t.name == "to5")
    target.CopyFrom(numpy_helper.from_array(np.array([1, H_WIDTH, 2, SIDE, SIDE], np.int64), "to5"))
    for model in (other_perm, other_target):
        ir = GraphIR(io.ModelHandle(proto=model))
        group, _ = find_routed_group(ir, analysis.find_layer(ir, "a"))
        found = simulate(ir, group.region, width)
        assert _same_routing(found, _alone(ir, group.region, width))
        assert not _same_routing(found, original), "a kept routing of another model was returned"
