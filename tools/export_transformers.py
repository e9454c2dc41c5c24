"""Export the tiny transformers shipped in models/ (random weights, no downloads).

    pip install -e ".[experiments]"
    python tools/export_transformers.py

* models/bert_tiny.onnx: Hugging Face BertForSequenceClassification (hidden 64,
  2 layers, 4 heads, intermediate 128, vocab 100, 3 labels); input `input_ids`
  int64 [batch, 8], output `logits`. Post-norm encoder, Erf GELU, fused
  LayerNormalization.
* models/vit_tiny.onnx: Hugging Face ViTModel (hidden 64, 2 layers, 4 heads,
  intermediate 128, 32x32 images, 8x8 patches), pooled output; input
  `pixel_values` float [batch, 3, 32, 32], output `pooler_output`. Pre-norm
  encoder with a class token (Expand + Concat).

Both use torch.onnx.export's legacy exporter at opset 17 with a dynamic batch.
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


def export(model, example, path: Path, input_name: str, output_name: str) -> None:
    model.eval()
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=[input_name],
                      output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    print(f"{path.name}: {path.stat().st_size // 1024} KB")


def main() -> int:
    warnings.filterwarnings("ignore")
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTModel

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=32, num_labels=3))
    export(_Output(bert, "input_ids", "logits"), torch.randint(0, 100, (2, 8)), MODELS / "bert_tiny.onnx",
           "input_ids", "logits")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             image_size=32, patch_size=8))
    export(_Output(vit, "pixel_values", "pooler_output"), torch.randn(1, 3, 32, 32), MODELS / "vit_tiny.onnx",
           "pixel_values", "pooler_output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
