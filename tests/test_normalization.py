"""LayerNorm over the units: tiling (widths that are multiples) and LEMON's
average expansion (any width) on pre-norm graphs built with onnx.helper, on
the shipped transformers, and the refusals where the expansion would not be
exact (post-norm, per-unit scales, non-linear ops before the norm)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_net2net as n2n

from helpers import H, MODELS, attr, init, make_model, node, rand, widen_exact

B, T, D_IN, D, F = 2, 3, 5, 6, 7
EPS = 1e-5


def residual_model(*, post_norm: bool = False, stream_op: str | None = None, decomposed: bool = False,
                   rms: bool = False, seed: int = 0):
    """x -> embed -> [block] -> final norm -> head. Pre-norm block:
    s1 = s0 + fc2(relu(fc1(norm1(s0)))); post-norm: s1 = norm1(s0 + fc2(relu(fc1(s0)))).
    Norms are LayerNormalization, RMSNormalization (`rms`, opset 23) or a
    decomposed LayerNorm / RMSNorm (`decomposed`)."""
    rng = np.random.default_rng(seed)
    inits = {"w_embed": rand(rng, D_IN, D), "b_embed": rand(rng, D), "w_fc1": rand(rng, D, F), "w_fc2": rand(rng, F, D),
             "b_fc2": rand(rng, D), "w_head": rand(rng, D, 2)}
    for name in ("norm1", "norm_f"):
        inits[f"{name}_scale"] = (1 + rand(rng, D, scale=0.3)).astype(np.float32)
        inits[f"{name}_bias"] = rand(rng, D, scale=0.3)
    nodes = [H("MatMul", ["x", "w_embed"], ["e"], name="embed"), H("Add", ["e", "b_embed"], ["s0"])]
    if stream_op == "relu":
        nodes.append(H("Relu", ["s0"], ["s0r"]))
    elif stream_op == "layer-scale":
        inits["gamma"] = rand(rng, D)
        nodes.append(H("Mul", ["s0", "gamma"], ["s0r"]))
    elif stream_op == "shared-scale":
        inits["half"] = np.array(0.5, np.float32)
        nodes.append(H("Mul", ["s0", "half"], ["s0r"]))
    else:
        nodes.append(H("Identity", ["s0"], ["s0r"]))

    def norm(source, name, out):
        if rms and not decomposed:
            nodes.append(H("RMSNormalization", [source, f"{name}_scale"], [out], axis=-1, epsilon=EPS, name=name))
            return
        if rms:
            inits.setdefault("two", np.array(2.0, np.float32))
            inits.setdefault("eps", np.array(EPS, np.float32))
            nodes.extend([
                H("Pow", [source, "two"], [f"{name}_sq"]), H("ReduceMean", [f"{name}_sq"], [f"{name}_ms"], axes=[-1]),
                H("Add", [f"{name}_ms", "eps"], [f"{name}_me"]), H("Sqrt", [f"{name}_me"], [f"{name}_rms"]),
                H("Div", [source, f"{name}_rms"], [f"{name}_n"]), H("Mul", [f"{name}_n", f"{name}_scale"], [out])])
            return
        if not decomposed:
            nodes.append(H("LayerNormalization", [source, f"{name}_scale", f"{name}_bias"], [out], axis=-1,
                           epsilon=EPS, name=name))
            return
        inits.setdefault("two", np.array(2.0, np.float32))
        inits.setdefault("eps", np.array(EPS, np.float32))
        nodes.extend([
            H("ReduceMean", [source], [f"{name}_mu"], axes=[-1]), H("Sub", [source, f"{name}_mu"], [f"{name}_c"]),
            H("Pow", [f"{name}_c", "two"], [f"{name}_sq"]), H("ReduceMean", [f"{name}_sq"], [f"{name}_var"], axes=[-1]),
            H("Add", [f"{name}_var", "eps"], [f"{name}_ve"]), H("Sqrt", [f"{name}_ve"], [f"{name}_sd"]),
            H("Div", [f"{name}_c", f"{name}_sd"], [f"{name}_n"]), H("Mul", [f"{name}_n", f"{name}_scale"], [f"{name}_m"]),
            H("Add", [f"{name}_m", f"{name}_bias"], [out])])

    if post_norm:
        nodes += [H("MatMul", ["s0r", "w_fc1"], ["h"], name="fc1"), H("Relu", ["h"], ["a"]),
                  H("MatMul", ["a", "w_fc2"], ["o"], name="fc2"), H("Add", ["o", "b_fc2"], ["ob"]),
                  H("Add", ["s0r", "ob"], ["sum"])]
        norm("sum", "norm1", "s1")
    else:
        norm("s0r", "norm1", "n1")
        nodes += [H("MatMul", ["n1", "w_fc1"], ["h"], name="fc1"), H("Relu", ["h"], ["a"]),
                  H("MatMul", ["a", "w_fc2"], ["o"], name="fc2"), H("Add", ["o", "b_fc2"], ["ob"]),
                  H("Add", ["s0r", "ob"], ["s1"])]
    norm("s1", "norm_f", "nf")
    nodes.append(H("MatMul", ["nf", "w_head"], ["y"], name="head"))
    if rms:
        for name in ("norm1", "norm_f"):
            del inits[f"{name}_bias"]
    opset = 23 if rms and not decomposed else 17
    return make_model(nodes, [("x", [B, T, D_IN])], [("y", [B, T, 2])], inits, opset=opset,
                      ir_version=11 if opset >= 23 else 10)


def _layer(model, name="embed"):
    return {l["name"]: l for l in n2n.inspect(model, trial=False)["layers"]}[name]


def test_prenorm_stream_grows_to_any_width():
    layer = _layer(residual_model())
    assert layer["widen"]["ok"] and layer["widen"]["step"] == 1
    assert set(layer["widen"]["group"]) == {"embed", "fc2"}


@pytest.mark.parametrize("width", [7, 9, 11, 12, 16])
@pytest.mark.parametrize("split", ["equal", "random"])
def test_average_expansion_is_exact_at_any_width(width, split):
    model = residual_model()
    grown, _ = widen_exact(model, {"embed": width}, split=split, seed=2)
    _check_average_expansion(model, grown, width)


def _check_average_expansion(model, grown, width):
    k, r = divmod(width, D)
    s = k * D / width
    assert init(grown, "w_embed").shape == (D_IN, width) and init(grown, "w_head").shape == (width, 2)
    # The extra units carry the mean: their producer columns are the mean column.
    np.testing.assert_allclose(init(grown, "w_embed")[:, k * D:],
                               np.repeat(init(model, "w_embed").mean(axis=1, keepdims=True), r, axis=1), rtol=1e-6)
    # Consumers read them with weight 0; the norms rescale.
    assert not init(grown, "w_head")[k * D:].any() and not init(grown, "w_fc1")[k * D:].any()
    np.testing.assert_allclose(init(grown, "norm1_scale")[:D], init(model, "norm1_scale") * np.sqrt(s), rtol=1e-6)
    assert not init(grown, "norm1_bias")[k * D:].any()
    fused = [n for n in grown.graph.node if n.name == "norm1"]
    if fused:
        assert attr(fused[0], "epsilon") == pytest.approx(EPS * s, rel=1e-6)
    else:
        add = next(n for n in grown.graph.node if n.op_type == "Add" and "norm1_ve" in n.output)
        assert float(init(grown, add.input[1])) == pytest.approx(EPS * s, rel=1e-6)


@pytest.mark.parametrize("width", [7, 11, 16])
def test_average_expansion_of_layernorm_written_as_ops(width):
    model = residual_model(decomposed=True)
    layer = _layer(model)
    assert layer["widen"]["step"] == 1 and "LEMON" in layer["widen"]["note"]
    grown, _ = widen_exact(model, {"embed": width}, split="random", seed=1)
    _check_average_expansion(model, grown, width)


def test_multiples_tile_and_leave_the_norm_alone():
    model = residual_model()
    grown, _ = widen_exact(model, {"embed": 2 * D})
    np.testing.assert_array_equal(init(grown, "norm1_scale"), np.tile(init(model, "norm1_scale"), 2))
    assert attr(node(grown, "norm1"), "epsilon") == pytest.approx(EPS)


def test_a_shared_scale_before_the_norm_commutes_with_averaging():
    widen_exact(residual_model(stream_op="shared-scale"), {"embed": 8}, split="random")


@pytest.mark.parametrize("kind, reason", [
    ({"post_norm": True}, "post-norm"),
    ({"stream_op": "relu"}, "Relu"),
    ({"stream_op": "layer-scale"}, "scales each unit by its own factor"),
    ({"decomposed": True, "post_norm": True}, "post-norm"),
    ({"decomposed": True, "stream_op": "relu"}, "Relu"),
])
def test_uneven_widths_are_refused_where_averaging_is_not_exact(kind, reason):
    model = residual_model(**kind)
    layer = _layer(model)
    assert layer["widen"]["ok"] and layer["widen"]["step"] == D  # multiples still work
    with pytest.raises(n2n.UserError, match=f"multiple of {D}.*LEMON.*{reason}"):
        n2n.widen(model, {"embed": D + 1})
    widen_exact(model, {"embed": 2 * D})


def test_shipped_prenorm_vit_grows_its_residual_stream_to_any_width():
    layer = "/model/layers.0/attention/o_proj/MatMul"
    grown, _ = widen_exact(MODELS / "vit_tiny.onnx", {layer: 72}, split="random")
    before = {n.name: attr(n, "epsilon") for n in onnx.load(str(MODELS / "vit_tiny.onnx")).graph.node
              if n.op_type == "LayerNormalization"}
    after = {n.name: attr(n, "epsilon") for n in grown.graph.node if n.op_type == "LayerNormalization"}
    assert before and all(after[name] == pytest.approx(eps * 64 / 72) for name, eps in before.items())


def test_shipped_postnorm_bert_says_why_it_needs_multiples():
    with pytest.raises(n2n.UserError, match="post-norm"):
        n2n.widen(MODELS / "bert_tiny.onnx", {"/model/bert/encoder/layer.0/output/dense/MatMul": 96})


def test_inspect_says_which_widths_a_normalised_group_takes():
    prenorm, postnorm = _layer(residual_model()), _layer(residual_model(post_norm=True))
    assert "LEMON's average expansion" in prenorm["widen"]["note"]
    assert "multiples only" in postnorm["widen"]["note"] and "post-norm" in postnorm["widen"]["note"]


@pytest.mark.parametrize("kind", [{}, {"post_norm": True}, {"stream_op": "layer-scale"}, {"stream_op": "relu"}])
@pytest.mark.parametrize("width", [7, 11, 12])
def test_rms_norm_grows_to_any_width_with_zero_extras(kind, width):
    model = residual_model(rms=True, **kind)
    assert _layer(model)["widen"]["step"] == 1
    grown, _ = widen_exact(model, {"embed": width}, split="random", seed=1)
    k = width // D
    # The extra units are zero before every RMS norm: zero producer columns.
    assert not init(grown, "w_embed")[:, k * D:].any() and not init(grown, "b_embed")[k * D:].any()
    assert attr(node(grown, "norm1"), "epsilon") == pytest.approx(EPS * k * D / width, rel=1e-6)


@pytest.mark.parametrize("kind", [{}, {"post_norm": True}])
def test_rms_norm_written_as_ops_grows_to_any_width(kind):
    model = residual_model(rms=True, decomposed=True, **kind)
    assert _layer(model)["widen"]["step"] == 1
    widen_exact(model, {"embed": D + 2}, split="random")
    widen_exact(model, {"embed": 3 * D}, split="random")


def test_norm_over_flattened_channels_takes_multiples_only():
    """Conv -> Flatten [N, C*H*W] -> LayerNorm: each unit is H*W features, so
    the mean of the units is not the mean of the features (no LEMON)."""
    rng = np.random.default_rng(0)
    channels, side = 3, 2
    features = channels * side * side
    inits = {"w": rand(rng, channels, 2, 3, 3), "s": (1 + rand(rng, features, scale=0.2)), "b": rand(rng, features),
             "fc": rand(rng, features, 2)}
    nodes = [H("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), H("Flatten", ["c"], ["f"]),
             H("LayerNormalization", ["f", "s", "b"], ["n"], axis=-1, name="ln"), H("MatMul", ["n", "fc"], ["y"])]
    model = make_model(nodes, [("x", [1, 2, side, side])], [("y", [1, 2])], inits)
    layer = _layer(model, "conv")
    assert layer["widen"]["step"] == channels and "several features" in layer["widen"]["note"]
    widen_exact(model, {"conv": 2 * channels}, split="random")
