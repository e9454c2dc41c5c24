"""Export the tiny transformers shipped in models/ (random weights, no downloads).

    pip install -e ".[experiments]"
    python tools/export_transformers.py                # all three
    python tools/export_transformers.py gpt2_tiny      # some

* models/bert_tiny.onnx: Hugging Face BertForSequenceClassification (hidden 64,
  2 layers, 4 heads, intermediate 128, vocab 100, 3 labels); input `input_ids`
  int64 [batch, 8], output `logits`. Post-norm encoder, Erf GELU, fused
  LayerNormalization.
* models/vit_tiny.onnx: Hugging Face ViTModel (hidden 64, 2 layers, 4 heads,
  intermediate 128, 32x32 images, 8x8 patches), pooled output; input
  `pixel_values` float [batch, 3, 32, 32], output `pooler_output`. Pre-norm
  encoder with a class token (Expand + Concat).

* models/gpt2_tiny.onnx: Hugging Face GPT2LMHeadModel (hidden 64, 2 layers,
  4 heads, vocab 100, 32 positions), eager attention, all-ones attention mask;
  input `input_ids` int64 [batch, 8], output `logits`. Pre-norm, fused Q/K/V
  (`c_attn`: one Gemm cut by a Split), Tanh GELU, tied embeddings.

All use torch.onnx.export's legacy exporter at opset 17 with a dynamic batch.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

MODELS = Path(__file__).resolve().parents[1] / "models"


class _Output(torch.nn.Module):
    """Calls a Hugging Face model with one keyword input and returns one output."""

    def __init__(self, model, key: str, output: str):
        super().__init__()
        self.model, self.key, self.output = model, key, output

    def forward(self, x):
        return getattr(self.model(**{self.key: x}), self.output)


class _CausalLM(torch.nn.Module):
    """GPT-2 on token ids with an all-ones attention mask (so the exporter does not
    trace the packed-sequence detection of transformers' masking code)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits


def export(model, example, path: Path, input_name: str, output_name: str) -> None:
    model.eval()
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=[input_name],
                      output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    print(f"{path.name}: {path.stat().st_size // 1024} KB")


def main() -> int:
    warnings.filterwarnings("ignore")
    wanted = set(sys.argv[1:]) or {"bert_tiny", "vit_tiny", "gpt2_tiny"}
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

    if "bert_tiny" in wanted:
        torch.manual_seed(0)
        bert = BertForSequenceClassification(BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
            max_position_embeddings=32, num_labels=3))
        export(_Output(bert, "input_ids", "logits"), torch.randint(0, 100, (2, 8)), MODELS / "bert_tiny.onnx",
               "input_ids", "logits")
    if "vit_tiny" in wanted:
        torch.manual_seed(0)
        vit = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8))
        export(_Output(vit, "pixel_values", "pooler_output"), torch.randn(1, 3, 32, 32), MODELS / "vit_tiny.onnx",
               "pixel_values", "pooler_output")
    if "gpt2_tiny" in wanted:
        torch.manual_seed(0)
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
                            eos_token_id=0)
        config._attn_implementation = "eager"
        export(_CausalLM(GPT2LMHeadModel(config)), torch.randint(0, 100, (2, 8)), MODELS / "gpt2_tiny.onnx",
               "input_ids", "logits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
