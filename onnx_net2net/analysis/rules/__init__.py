"""The op rules of the walk, by op type and by op family.

Each rule receives the walk, the node, the side ("in"/"out") and port where
the units arrived, and their placement there; it adds the node's other
tensors carrying the space and the edits, or refuses (see walk.py). An op
with no rule is refused: it is not known to act on each unit separately.
"""

from __future__ import annotations

from ...ops import ELEMENTWISE_NARY, ELEMENTWISE_UNARY, POOLING, REDUCTIONS, RESHAPES
from ..walk import Rule
from .attention import softmax
from .concat_split import concat, slice_op, split
from .elementwise import elementwise, pool, shape_op, unary
from .layout import expand, gather, gather_nd, pad, reshape, resize, tile, transpose
from .normalisation import batchnorm, groupnorm, instancenorm, layernorm, reduce
from .quantized import quantize_linear
from .weighted import conv, conv_transpose, gemm, matmul

RULES: dict[str, Rule] = {
    "BatchNormalization": batchnorm,
    "InstanceNormalization": instancenorm,
    "GroupNormalization": groupnorm,
    "Concat": concat,
    "Split": split,
    "Slice": slice_op,
    "Transpose": transpose,
    "Shape": shape_op,
    "Size": shape_op,
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": matmul,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "LayerNormalization": layernorm,
    "RMSNormalization": layernorm,
    "Pad": pad,
    "Gather": gather,
    "GatherND": gather_nd,
    "Resize": resize,
    "Expand": expand,
    "Tile": tile,
    "QuantizeLinear": quantize_linear,
    "DequantizeLinear": quantize_linear,
}
FAMILY_RULES: list[tuple[frozenset, Rule]] = [
    (ELEMENTWISE_UNARY, unary),
    (ELEMENTWISE_NARY, elementwise),
    (POOLING, pool),
    (REDUCTIONS, reduce),
    (RESHAPES, reshape),
]


def rule_for(op_type: str) -> Rule | None:
    """The rule for `op_type`: its own, else its family's (None: unknown)."""
    rule = RULES.get(op_type)
    if rule is not None:
        return rule
    for family, family_rule in FAMILY_RULES:
        if op_type in family:
            return family_rule
    return None
