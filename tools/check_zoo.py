"""Grow every layer of real architectures and check each result is exact.

Needs the experiments extra plus `pip install transformers timm` for the
transformer models. Models are built from their configs with random weights
(no downloads), exported with torch.onnx.export (legacy exporter at opset 17
with a dynamic batch, or the dynamo exporter at opset 18 with `--exporter dynamo`),
then for each model:

1. `inspect` without trial runs (static analysis only: the promise under test);
2. every group reported growable is widened by about 1.5x (rounded to its
   step; for a channel-shuffle stage whose valid widths are irregular, the
   first valid width from 1.5x up) and every layer reported deepenable is deepened,
   and the whole model is widened with `--factor 1.5`; each result must pass
   `onnx.checker.check_model(full_check=True)` and `inspect`, and match the
   original in onnxruntime (max relative error 1e-5).

A layer reported growable that fails is a DEFECT (exit code 1).

    python tools/check_zoo.py                      # all models
    python tools/check_zoo.py resnet18 bert_cls    # some
    python tools/check_zoo.py --json zoo.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")

MAX_REL = 1e-5  # max |a - b| / max(1, |a|) over every output element
#: A model whose output moves by more than MAX_REL when every weight moves by one ulp (its float32 floor)
#: cannot be held to MAX_REL in float32: there a rewrite that misses MAX_REL is judged again in float64
#: (onnx.reference, the original and the rewrite both cast to float64), where float32 arithmetic is out of it.
TORCHVISION = ["resnet18", "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x0_5",
               "squeezenet1_0", "densenet121"]
OTHERS = ["convnext_atto", "timm_vit", "bert_cls", "vit", "gpt2", "nanogpt"]
#: timm models (64x64, 10 classes) whose units sit in some parts of an output or in grouped-conv groups.
TIMM_PARTS = {
    "fasternet_t0": "partial convolution: the stream split [C/4 | 3C/4], one part convolved",
    "mambaout_femto": "gated block: fc1 writes [g | i | c], g's head gates i and its tail c",
    "resnest14d": "split attention: a grouped conv writes one radix split per group",
    "efficientvit_b0": "multi-scale linear attention: heads through a grouped conv, viewed [2 n, 3 d]",
}
#: Patterns of issue 14 (packed attention, runtime sizes, patch merging...): run them by name.
PATTERNS = ["mha_vit", "lraspp", "weightnorm_conv", "swin_t", "mixer", "mobilevit_xxs", "llama_gqa", "qwen2_gqa",
            "bert_encoder", "fastvit_t8", "coatnet_nano", "edgenext_xx_small", "efficientvit_m0", "mobilevitv2_050",
            *list(TIMM_PARTS)]


def nanogpt(vocab: int = 100, width: int = 64, heads: int = 4, layers: int = 2, context: int = 32):
    """A small GPT written by hand the usual way (nanoGPT): one qkv Linear,
    split on the last axis, view(B, T, h, D // h) with sizes read from x.shape,
    a causal mask, reshape(B, T, D), learned positions sliced with [:, :T]."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj, self.heads = nn.Linear(width, 3 * width), nn.Linear(width, width), heads
            self.register_buffer("mask", torch.tril(torch.ones(context, context)).view(1, 1, context, context))

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.qkv(x).split(D, dim=2)
            q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf")).softmax(dim=-1)
            return self.proj((att @ v).transpose(1, 2).contiguous().view(B, T, D))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.attn, self.ln2 = nn.LayerNorm(width), Attention(), nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, width)
            self.pos = nn.Parameter(torch.randn(1, context, width) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

        def forward(self, idx):
            x = self.tok(idx) + self.pos[:, :idx.shape[1]]
            return self.head(self.ln(self.blocks(x)))

    return GPT()


#: Encoders whose hidden state is the output: checked with keep_output_shapes.
KEEP_OUTPUT_MODELS = {"bert_encoder"}
#: Models exported with a dynamic sequence axis too (sizes read at run time).
SEQUENCE_MODELS = {"nanogpt"}


def observable(model, example) -> None:
    """Make every grown layer visible at the outputs, or verification proves nothing.

    Freshly initialised models can hide their layers: a zero-initialised head
    (timm's MLP-Mixer, torchvision's VisionTransformer) outputs zeros, a layer
    scale of 1e-6 (ConvNeXt) hides its branch, and in torchvision's
    EfficientNet-B0 and MobileNetV2 (fan-out init of depthwise convolutions,
    batch norms that normalise nothing) activations shrink to ~1e-13 before
    the head, so the output is its bias whatever the input: a wrong rewrite
    would pass. So the batch norms are calibrated on random inputs (their
    statistics are those of the activations they see, as after training) and
    get random affine terms, and parameters that are all below 1e-4 get random
    values. The export is refused unless the output then depends on the input.
    """
    import torch

    def other_input():
        if example.is_floating_point():
            return torch.randn(8, *example.shape[1:])
        return torch.randint(0, int(example.max()) + 1, example.shape)

    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.is_floating_point() or parameter.abs().max() >= 1e-4:
                continue
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.2)
            else:
                parameter.uniform_(0.5, 1.0)
        if norms:
            momenta = [m.momentum for m in norms]
            for module in norms:
                module.reset_running_stats()
                module.momentum = None  # a cumulative average over the calibration batches
            model.train()
            for _ in range(4):
                model(other_input())
            model.eval()
            for module, momentum in zip(norms, momenta):
                module.momentum = momentum
                if module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0, 0.1)
        first, second = model(example), model(other_input()[:example.shape[0]])
    change = float((first - second).abs().max()) / max(float(first.abs().max()), 1e-30)
    if not change > 1e-3:
        raise SystemExit(f"the exported model's output hardly depends on its input (relative change {change:.2g}): "
                         "verification could not see a wrong rewrite")


def export(name: str, path: Path, exporter: str = "legacy") -> None:
    import torch

    torch.manual_seed(0)

    class Wrap(torch.nn.Module):
        def __init__(self, model, key, output):
            super().__init__()
            self.model, self.key, self.output = model, key, output

        def forward(self, x):
            extra = {"attention_mask": torch.ones_like(x), "use_cache": False} if self.key == "input_ids" else {}
            return getattr(self.model(**{self.key: x}, **extra), self.output)

    class DictOutput(torch.nn.Module):
        def __init__(self, model, key):
            super().__init__()
            self.model, self.key = model, key

        def forward(self, x):
            return self.model(x)[self.key]

    if name in TIMM_PARTS:
        import timm

        model, example = timm.create_model(name, pretrained=False, num_classes=10), torch.randn(1, 3, 64, 64)
    elif name in TORCHVISION:
        import torchvision

        model, example = getattr(torchvision.models, name)(weights=None), torch.randn(1, 3, 64, 64)
    elif name == "convnext_atto":
        import timm

        model, example = timm.create_model("convnext_atto", pretrained=False), torch.randn(1, 3, 64, 64)
    elif name == "fastvit_t8":  # depthwise convs with 2 filters per channel join the stages into one group
        import timm

        model, example = timm.create_model("fastvit_t8", pretrained=False, num_classes=10), torch.randn(1, 3, 64, 64)
    elif name == "coatnet_nano":  # a 1x1 conv writes whole attention heads
        import timm

        model = timm.create_model("coatnet_nano_rw_224", pretrained=False, num_classes=10, img_size=64)
        example = torch.randn(1, 3, 64, 64)
    elif name == "edgenext_xx_small":  # chunks of the stream feed one another: it holds its units once per chunk
        import timm

        model = timm.create_model("edgenext_xx_small", pretrained=False, num_classes=10)
        example = torch.randn(1, 3, 64, 64)
    elif name == "efficientvit_m0":  # cascaded heads: chunks of the stream added to v @ attn^T
        import timm

        model = timm.create_model("efficientvit_m0", pretrained=False, num_classes=10, img_size=64)
        example = torch.randn(1, 3, 64, 64)
    elif name == "mobilevitv2_050":  # separable attention: one conv writes [1 | k | v], k and v one space
        import timm

        model = timm.create_model("mobilevitv2_050", pretrained=False, num_classes=10)
        example = torch.randn(1, 3, 64, 64)
    elif name == "timm_vit":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        example = torch.randn(1, 3, 32, 32)
    elif name == "bert_cls":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=100, max_position_embeddings=32, num_labels=3)
        model, example = Wrap(BertForSequenceClassification(config), "input_ids", "logits"), torch.randint(0, 100, (2, 8))
    elif name == "vit":
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=32, patch_size=8)
        model, example = Wrap(ViTModel(config), "pixel_values", "pooler_output"), torch.randn(1, 3, 32, 32)
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
        model, example = Wrap(GPT2LMHeadModel(config), "input_ids", "logits"), torch.randint(0, 100, (2, 8))
    elif name == "mha_vit":
        import torchvision

        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                     hidden_dim=64, mlp_dim=128, num_classes=10)
        example = torch.randn(1, 3, 32, 32)
    elif name == "lraspp":
        import torchvision

        model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                          num_classes=3)
        model, example = DictOutput(model, "out"), torch.randn(1, 3, 64, 64)
    elif name == "weightnorm_conv":
        from torch.nn.utils.parametrizations import weight_norm

        model = torch.nn.Sequential(weight_norm(torch.nn.Conv1d(4, 16, 3, padding=1)), torch.nn.GELU(),
                                    weight_norm(torch.nn.Conv1d(16, 16, 3, padding=1)), torch.nn.GELU(),
                                    torch.nn.Conv1d(16, 4, 1))
        example = torch.randn(1, 4, 32)
    elif name == "swin_t":
        import torchvision

        model, example = torchvision.models.swin_t(weights=None, num_classes=10), torch.randn(1, 3, 64, 64)
    elif name == "mixer":
        from timm.models.mlp_mixer import MlpMixer

        model = MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=64, num_classes=10)
        example = torch.randn(1, 3, 32, 32)
    elif name == "mobilevit_xxs":
        import timm

        model, example = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10), torch.randn(1, 3, 64, 64)
    elif name in ("llama_gqa", "qwen2_gqa"):
        import transformers

        kind = "Llama" if name == "llama_gqa" else "Qwen2"
        config = getattr(transformers, f"{kind}Config")(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                                       max_position_embeddings=64)
        model = Wrap(getattr(transformers, f"{kind}ForCausalLM")(config), "input_ids", "logits")
        example = torch.randint(0, 100, (2, 8))
    elif name == "bert_encoder":
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=100, max_position_embeddings=32)
        model, example = Wrap(BertModel(config), "input_ids", "last_hidden_state"), torch.randint(0, 100, (2, 8))
    elif name == "nanogpt":
        model, example = nanogpt(), torch.randint(0, 100, (2, 8))
    else:
        raise SystemExit(f"unknown model {name}")
    model.eval()
    observable(model, example)
    if exporter == "dynamo":
        dynamic = None
        if name in SEQUENCE_MODELS:
            dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("sequence", max=32)}
            dynamic = ({k: v for k, v in dims.items() if k < example.dim()},)
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=18, input_names=["input"],
                          external_data=False, verbose=False, dynamic_shapes=dynamic)
    else:
        axes = {0: "batch", 1: "sequence"} if name in SEQUENCE_MODELS else {0: "batch"}
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          dynamic_axes={"input": axes})


def check(path: Path, limit: int | None, keep_outputs: bool = False) -> dict:
    from onnx_net2net import io
    from onnx_net2net.inspection import inspect_model
    from onnx_net2net.passes import DeepenPass, WidenPass
    from onnx_net2net.verification import ReferenceRun

    handle = io.load(path)
    layers = inspect_model(handle, trial=False)["layers"]
    if keep_outputs:
        layers = _with_kept_outputs(handle, layers)
    eligible = [l for l in layers if not (l["widen"]["reason"] and "graph output" in l["widen"]["reason"])]
    reference = ReferenceRun(handle.proto)
    floor = float_floor(reference, handle.proto)
    judge = Float64Judge(reference, handle.proto) if floor > MAX_REL else None
    defects, checked, seen = [], 0, set()
    for layer in [l for l in eligible if l["widen"]["ok"]][:limit]:
        key = tuple(layer["widen"]["group"])
        if key in seen:
            continue
        seen.add(key)
        width, step = layer["width"], layer["widen"]["step"]
        new = width + step * max(1, math.ceil((math.ceil(width * 1.5) - width) / step))
        new = _routable(handle, layer["name"], new)
        defects += _try(reference, lambda: WidenPass({layer["name"]: new}, keep_output_shapes=keep_outputs)(
            handle.proto).model, f"widen {layer['name']} -> {new}", judge)
        checked += 1
    for layer in [l for l in eligible if l["deepen"]["ok"]][:limit]:
        defects += _try(reference, lambda: DeepenPass([layer["name"]])(handle.proto).model,
                        f"deepen {layer['name']}", judge)
        checked += 1
    if any(l["widen"]["ok"] for l in layers):
        defects += _try(reference, lambda: WidenPass(factor=1.5)(handle.proto).model, "widen --factor 1.5", judge)
        checked += 1
    refusals = {}
    for layer in eligible:
        if not layer["widen"]["ok"]:
            refusals[layer["widen"]["reason"]] = refusals.get(layer["widen"]["reason"], 0) + 1
    return {"layers": len(layers), "eligible": len(eligible),
            "widen_ok": sum(l["widen"]["ok"] for l in eligible), "deepen_ok": sum(l["deepen"]["ok"] for l in eligible),
            "checked": checked, "defects": defects, "refusals": refusals, "float_floor": floor,
            "float64_rechecks": judge.rechecks if judge else []}


class Float64Judge:
    """The max relative error of a rewrite with the original and the rewrite
    evaluated in float64 by onnx.reference, on the reference's inputs: what
    is left is the rewrite's own (its weights are still float32 numbers)."""

    def __init__(self, reference, model):
        self.feeds = {name: value.astype(np.float64) if value.dtype == np.float32 else value
                      for name, value in reference.feeds.items()}
        self.expected = self._run(model)
        self.rechecks: list[str] = []

    def error(self, candidate, what: str) -> float:
        error = max(float((np.abs(a - b) / np.maximum(1, np.abs(a))).max())
                    for a, b in zip(self.expected, self._run(candidate)))
        self.rechecks.append(f"{what}: float64 max rel err {error:.2g}")
        return error

    def _run(self, model) -> list:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(as_float64(model)).run(None, self.feeds)


def as_float64(model):
    """A copy of the model computing in float64 (initializers, inputs, outputs, Casts and constants)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.DOUBLE
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                value = numpy_helper.to_array(attribute.t).astype(np.float64)
                attribute.t.CopyFrom(numpy_helper.from_array(value, attribute.t.name))
    return wide


def float_floor(reference, model) -> float:
    """The max relative output change when every float32 weight and bias of a
    Conv, ConvTranspose, Gemm or MatMul moves by one unit in the last place (up or down at random), as one more rounding can
    move it (one random draw, seeded; weights held in Constant nodes stay):
    how exactly this model's function can be reproduced in float32 at all,
    whatever the rewrite."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    weights = {name for node in moved.graph.node if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
               for name in node.input[1:3]}  # not every float constant: some compute sizes and positions
    for init in moved.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.name in weights:
            value = numpy_helper.to_array(init)
            nudged = np.nextafter(value, rng.choice(np.array([-np.inf, np.inf], np.float32), value.shape))
            init.CopyFrom(numpy_helper.from_array(nudged, init.name))
    return reference.compare(moved).max_rel


def _with_kept_outputs(handle, layers: list[dict]) -> list[dict]:
    """Layers refused only because their units reach a graph output, analysed
    again with keep_output_shapes (the outputs are sliced back)."""
    from onnx_net2net import analysis
    from onnx_net2net.ir import GraphIR

    ir = GraphIR(handle)
    for layer in layers:
        if layer["widen"]["ok"] or "graph output" not in (layer["widen"]["reason"] or ""):
            continue
        group = analysis.find_group(ir, analysis.find_layer(ir, layer["name"]), keep_outputs=True)
        layer["widen"] = {"ok": group.ok, "reason": None if group.ok else str(group.refusal),
                          "step": group.feature_step, "group": [analysis.layer_name(ir, p) for p in group.producers]}
    return layers


def _routable(handle, name: str, width: int) -> int:
    """The first valid width from `width` up (a channel-shuffle stage's valid
    widths are irregular: else down; the note in `inspect` lists them)."""
    from onnx_net2net import analysis
    from onnx_net2net.folding import computed_weights, fold_computed_weights
    from onnx_net2net.ir import GraphIR

    ir = GraphIR(handle)
    if computed_weights(ir):  # as inspect and widen see the model: computed weights folded
        handle = handle.copy()
        fold_computed_weights(handle)
        ir = GraphIR(handle)
    group = analysis.find_group(ir, analysis.find_layer(ir, name))
    return group.next_width(ir, width) or width


def _try(reference, build, what: str, judge: Float64Judge | None = None) -> list[str]:
    """A defect: the rewrite fails, its output fails onnx's full check or
    `inspect`, or it does not match the original to MAX_REL (in float64 with
    `judge`, for a model whose float32 floor is above MAX_REL)."""
    import onnx

    from onnx_net2net.inspection import inspect_model
    from onnx_net2net.io import from_proto

    try:
        grown = build()
        onnx.checker.check_model(grown, full_check=True)
        inspect_model(from_proto(grown), trial=False)
        report = reference.compare(grown)
    except Exception as error:  # noqa: BLE001 - every failure is a finding here
        return [f"{what}: {type(error).__name__}: {error}"]
    if report.max_rel <= MAX_REL:
        return []
    if judge is not None:
        try:
            if judge.error(grown, what) <= MAX_REL:
                return []
        except Exception as error:  # noqa: BLE001 - no float64 evaluation: the float32 finding stands
            judge.rechecks.append(f"{what}: no float64 evaluation ({type(error).__name__}: {error})")
    return [f"{what}: max rel err {report.max_rel:.3g}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=TORCHVISION + OTHERS,
                        help=f"default: {' '.join(TORCHVISION + OTHERS)}; also: {' '.join(PATTERNS)}")
    parser.add_argument("--limit", type=int, help="check at most this many layers per model and kind")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy",
                        help="torch.onnx.export's TorchScript exporter (opset 17) or dynamo exporter (opset 18)")
    args = parser.parse_args()
    results, failed = {}, False
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            path = Path(folder) / f"{name}.onnx"
            start = time.time()
            export(name, path, args.exporter)
            result = check(path, args.limit, keep_outputs=name in KEEP_OUTPUT_MODELS)
            results[name] = result
            share = result["widen_ok"] / max(result["eligible"], 1)
            print(f"{name}: {result['widen_ok']}/{result['eligible']} growable ({share:.0%}), "
                  f"{result['deepen_ok']}/{result['eligible']} deepenable, {result['checked']} rewrites checked, "
                  f"{len(result['defects'])} defects ({time.time() - start:.0f}s)", flush=True)
            if result["float_floor"] > MAX_REL:
                print(f"    float32 floor {result['float_floor']:.2g} (every weight moved by one ulp): rewrites "
                      f"missing {MAX_REL:g} in float32 judged in float64")
                for line in result["float64_rechecks"]:
                    print(f"      {line}")
            for reason, count in sorted(result["refusals"].items(), key=lambda kv: -kv[1])[:3]:
                print(f"    refused x{count}: {reason}")
            for defect in result["defects"]:
                print(f"    DEFECT {defect}")
            failed |= bool(result["defects"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
