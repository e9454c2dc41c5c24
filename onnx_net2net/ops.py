"""Op families: ONNX ops grouped by how they treat the positions of an axis.

A leaf module (it imports nothing of the package), read by the unit-space
analysis (`onnx_net2net.analysis`), the runtime size checks and the
rewrites, so that every one of them means the same ops by the same family.
"""

from __future__ import annotations

# Ops that act on each element independently (all data ports share the placement).
ELEMENTWISE_UNARY = frozenset("""
    Relu LeakyRelu Sigmoid Tanh Gelu Erf Elu Selu Celu Softplus Softsign HardSigmoid
    HardSwish Mish ThresholdedRelu Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round
    Sign Sin Cos Tan Sinh Cosh Asin Acos Atan Asinh Acosh Atanh Identity Cast CastLike
    Dropout Not IsNaN IsInf Shrink Clip Bernoulli
""".split())
# Ops whose inputs broadcast against each other elementwise.
ELEMENTWISE_NARY = frozenset("""
    Add Sub Mul Div Pow Max Min Sum Mean Mod Where Equal Less LessOrEqual Greater
    GreaterOrEqual And Or Xor BitShift PRelu
""".split())
POOLING = frozenset("""
    MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool
""".split())
REDUCTIONS = frozenset("""
    ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceSumSquare
""".split())
RESHAPES = frozenset("Flatten Reshape Squeeze Unsqueeze".split())
WEIGHTED_LAYERS = frozenset("Conv ConvTranspose Gemm MatMul".split())
