"""The walk: every tensor carrying a unit space, found op by op.

Starting from the seed layer's output with its placement, the walk visits
each tensor carrying the units once, and hands every node that reads or
writes it to that op's rule (rules/), telling the rule the side ("in" or
"out"), the port and the placement where the units arrived. A rule adds the
node's other tensors that carry the space (with their placements) and the
edits the rewrite must make, or refuses. Walking in both directions finds
every producer (the weighted layers whose outputs are the space, which
copy units) and every consumer (the layers reading it, which split).

Some answers depend on what the rest of the walk finds: whether the inputs
of a concatenation, or the slices of a tensor, hold the same units (chunks
of a stream that holds its units once per chunk) is known only once every
one of them is reached. Such a rule defers its decision (`settle`) until the
queue is empty; the decision may add tensors, and the walk goes on.

Anything the walk does not understand exactly stops it with a `Refusal`
that names the op and the reason: a refusal is always preferred to a wrong
answer. The walk never changes the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NoReturn

import numpy as np

from ..ir import GraphIR
from ..ops import ELEMENTWISE_NARY, ELEMENTWISE_UNARY, POOLING, RESHAPES
from .quantized import dequantized_constant, quantized_reason
from .refined_shapes import refined_shape
from .refusal import Parts, Refusal, RefusalKind
from .units import Placement, UnitGroup, WeightEdit

#: Ops that keep units merged with a batch of unknown size apart (Placement.batch):
#: they move the axis, read its size, act per element or per batch position.
BATCH_MERGED_OPS = frozenset(ELEMENTWISE_UNARY | ELEMENTWISE_NARY | RESHAPES
                             | {"Transpose", "Shape", "Size", "Softmax", "LogSoftmax", "MatMul"})

#: Ops that keep a space repeated at uneven offsets (Placement.starts) in place:
#: per-channel ops (broadcasting ones edit a constant operand like a bias),
#: convolutions reading or writing the channels, a Split or Slice of the repeats, and
#: reshapes that keep the unit axis whole (their rule checks it). A MatMul or
#: Gemm with a constant weight keeps them on its weight's axis (`_edits_weight_axis`).
UNEVEN_REPEATS_OPS = frozenset(ELEMENTWISE_UNARY | ELEMENTWISE_NARY | POOLING | RESHAPES
                               | {"BatchNormalization", "Conv", "Concat", "Split", "Slice", "Shape", "Size"})

#: An op rule: (walk, node index, side, port, placement) -> None; it adds
#: tensors and edits to the walk's group, or refuses.
Rule = Callable[["Walk", int, str, int, Placement], None]


class Walk:
    """Breadth-first walk over (tensor, placement), dispatching to op rules.

    Args:
        ir: the graph.
        group: the group being filled in (placements, edits, step...).
        rule_for: the rule of an op type (None: not known to act per unit).
        keep_outputs: graph outputs may carry the units (`kept_outputs`).
    """

    def __init__(self, ir: GraphIR, group: UnitGroup, rule_for: Callable[[str], Rule | None],
                 keep_outputs: bool = False):
        self.rule_for = rule_for
        self.keep_outputs = keep_outputs
        self.ir = ir
        self.group = group
        self.queue: list[tuple[str, Placement]] = []
        #: decisions that need every tensor the walk can reach first (settle()), by key; the late
        #: ones run once no other is left
        self.deferred: dict[object, Callable[[], None]] = {}
        self.deferred_late: dict[object, Callable[[], None]] = {}
        self.visited_ports: set[tuple[int, str, int]] = set()
        self.outputs = set(ir.graph_outputs)
        self.inputs = set(ir.graph_inputs)

    def run(self, tensor: str, placement: Placement) -> None:
        """Walk from `tensor` until every tensor carrying the units is visited."""
        self.add(tensor, placement)
        while self.queue or self.deferred or self.deferred_late:
            if not self.queue:
                pending = self.deferred or self.deferred_late
                pending.pop(next(iter(pending)))()
                continue
            tensor, placement = self.queue.pop(0)
            self.visit(tensor, placement)

    def add(self, tensor: str, placement: Placement) -> None:
        """Queue a tensor carrying the units, refusing a second, different layout."""
        shape = self.ir.shapes.get(tensor)  # as inferred; no extra inference here
        if shape is not None and (len(shape) != placement.rank or
                                  shape[placement.axis] not in (None, placement.length)):
            raise Refusal(f"tensor '{tensor}' does not have the layout the walk expects "
                          f"({placement.length} positions on axis {placement.axis} of {shape})")
        known = self.group.placements.get(tensor)
        if known is not None:
            if known != placement:
                raise Refusal(f"tensor '{tensor}' carries the units in two different layouts "
                              f"({_difference(known, placement)})")
            return
        self.group.placements[tensor] = placement
        self.queue.append((tensor, placement))

    def visit(self, tensor: str, placement: Placement) -> None:
        """Hand the tensor's producer and readers to their rules."""
        if tensor in self.outputs and self.keep_outputs:
            self.group.kept_outputs[tensor] = placement
        elif tensor in self.outputs:
            raise Refusal(f"the units reach graph output '{tensor}' (its shape would change)")
        if tensor in self.inputs:
            raise Refusal(f"the units reach graph input '{tensor}' (its shape would change)")
        if self.ir.is_const(tensor):
            # A constant carrying the units (a class token, a learned table):
            # its entries are copied like a producer's.
            for use in self.ir.uses(tensor):
                self.group.weight_edits.append(WeightEdit(use.node, use.port, placement.axis, placement, "copy"))
        producer = None if self.ir.is_const(tensor) else self.ir.producer.get(tensor)
        if producer is not None:
            self.dispatch(producer[0], "out", producer[1], placement)
        for use in self.ir.uses(tensor):
            if use.port < 0:
                raise Refusal.at_layer(self.ir, use.node,
                                       f"{self.ir.nodes[use.node].op_type} reads '{tensor}' inside a subgraph")
            self.dispatch(use.node, "in", use.port, placement)

    def dispatch(self, index: int, side: str, port: int, placement: Placement) -> None:
        """Apply node `index`'s rule once per side and port."""
        key = (index, side, port)
        if key in self.visited_ports:
            return
        self.visited_ports.add(key)
        node = self.ir.nodes[index]
        rule = self.rule_for(node.op_type)
        if rule is None or node.domain not in ("", "ai.onnx"):
            self.refuse(index, "this op is not known to act on each unit separately")
        if placement.batch and node.op_type not in BATCH_MERGED_OPS:
            self.refuse(index, "the units are merged with a batch of unknown size on this axis (heads viewed as "
                               "[batch x heads]), which this op is not known to keep apart")
        if placement.starts and node.op_type not in UNEVEN_REPEATS_OPS and not _edits_weight_axis(
                self.ir, index, placement):
            self.refuse(index, "the units repeat at uneven offsets of a concatenation on this axis, "
                               "which this op is not known to keep")
        self.group.ops.add(node.op_type)
        rule(self, index, side, port, placement)

    # -- helpers for rules --------------------------------------------------

    def settle(self, key: object, decide: Callable[[], None], late: bool = False) -> None:
        """Run `decide` once the queue is empty: for a rule whose answer
        depends on which of its node's tensors carry the units, which only the
        rest of the walk can tell. One decision per `key` is pending at a time
        (a later request while it is pending is dropped), so `decide` must look
        at every port of its node, not at the one that asked. `late`: after
        every other pending decision (a Concat's waits for the Slices and
        Splits that may show its inputs are chunks of one tensor)."""
        (self.deferred_late if late else self.deferred).setdefault(key, decide)

    def refuse(self, index: int, reason: str, retry: tuple[tuple[int, int], ...] = (),
               kind: RefusalKind = RefusalKind.UNSUPPORTED, parts: tuple[Parts, ...] = ()) -> NoReturn:
        """Stop the walk: node `index` cannot carry the units exactly."""
        raise Refusal.at_op(self.ir, index, reason, kind, retry, parts)

    def shape(self, index: int, tensor: str) -> tuple:
        """The tensor's shape, inferred or refined (refused when unknown)."""
        shape = refined_shape(self.ir, tensor)
        if shape is None:
            self.refuse(index, f"the shape of '{tensor}' is unknown")
        return shape

    def rank(self, index: int, tensor: str) -> int:
        """`len(shape(index, tensor))`, without refining dims where ONNX
        inference found the rank."""
        known = self.ir.inferred_shape(tensor)
        return len(known) if known is not None else len(self.shape(index, tensor))

    def dim(self, index: int, tensor: str, axis: int) -> int | None:
        """`shape(index, tensor)[axis]`, without refining dims where ONNX
        inference found that one."""
        known = self.ir.inferred_shape(tensor)
        if known is not None and known[axis] is not None:
            return known[axis]
        return self.shape(index, tensor)[axis]

    def const(self, index: int, tensor: str, what: str) -> np.ndarray:
        """The constant's value (refused when computed or quantized)."""
        value = self.ir.const_value(tensor)
        quantized = dequantized_constant(self.ir, tensor) if value is None else None
        if quantized is not None:
            self.refuse(index, quantized_reason(self.ir, quantized, tensor, what))
        if value is None:
            self.refuse(index, f"its {what} '{tensor}' is not a constant")
        return value

    def weight(self, index: int, port: int, axis: int, placement: Placement, role: str, groups: int = 1) -> None:
        """Record the edit of the constant at `node.input[port]` along `axis`."""
        node = self.ir.nodes[index]
        if port >= len(node.input) or not node.input[port]:
            return
        if placement.batch:
            self.refuse(index, "the units are merged with a batch of unknown size on the axis of its weight")
        self.const(index, node.input[port], "weight")
        self.group.weight_edits.append(WeightEdit(index, port, axis, placement, role, groups))

    def require_blocks(self, index: int, placement: Placement, blocks: int) -> None:
        """The space must split into `blocks` equal blocks (grouped convolution);
        a space repeated R times along the channels (ResNeSt's radix splits,
        one group each) splits into blocks / R blocks in every repeat."""
        group = self.group
        repeats = placement.outer
        if (placement.offset or placement.inner != 1 or placement.length != group.size * repeats
                or blocks % repeats or placement.starts):
            self.refuse(index, f"grouped convolution (group={blocks}) over part of a concatenation")
        blocks //= repeats
        if group.tile and 1 < blocks < group.size:
            self.refuse(index, f"a normalisation takes statistics over these grouped-convolution units "
                               f"(group={blocks})")
        step = math.lcm(group.step, blocks)
        if group.size % step:
            self.refuse(index, f"grouped convolutions with {group.step} and {blocks} groups do not nest")
        group.step = step

    def same_on_ports(self, index: int, placement: Placement, inputs=(0,), outputs=(0,)) -> None:
        """The units sit the same way on these input and output ports."""
        node = self.ir.nodes[index]
        for port in inputs:
            if port < len(node.input) and node.input[port]:
                self.add(node.input[port], placement)
        for port in outputs:
            if port < len(node.output) and node.output[port]:
                self.add(node.output[port], placement)

    def require_channel_axis(self, index: int, placement: Placement, allow_blocks: bool = False) -> None:
        """The units must be on axis 1 of a rank >= 3 tensor, not interleaved;
        `allow_blocks`: units may be blocks of channels, and the space may
        repeat along the channels (per-channel ops and ordinary convolutions)."""
        if placement.axis != 1 or placement.rank < 3:
            self.refuse(index, f"the units are on axis {placement.axis}, not the channel axis")
        if not allow_blocks and (placement.outer != 1 or placement.inner != 1):
            self.refuse(index, "the units are interleaved with other data on the channel axis")


def _edits_weight_axis(ir: GraphIR, index: int, placement: Placement) -> bool:
    """A MatMul or Gemm with a constant weight reading or writing the units on
    the last axis: its rule edits the weight there (any placement, like a Conv)."""
    node = ir.nodes[index]
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or not ir.is_const(node.input[1]):
        return False
    return not ir.is_const(node.input[0]) and placement.axis == placement.rank - 1


def _difference(first: Placement, second: Placement) -> str:
    """How two placements of the units on one tensor differ: 'offset 0 vs 30'."""
    names = ("axis", "length", "offset", "inner", "outer", "batch", "starts")
    return ", ".join(f"{name} {getattr(first, name)} vs {getattr(second, name)}" for name in names
                     if getattr(first, name) != getattr(second, name))
