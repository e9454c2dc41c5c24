"""Deepen a residual network by a whole block (LLaMA Pro, Gesmundo & Maile).

A pre-norm residual block maps the stream r to

    r1 = r + f(r)          (e.g. attention on LayerNorm(r))
    r2 = r1 + h(r1)        (e.g. the MLP on LayerNorm(r1))

A copy of the block whose branch outputs f and h end in layers with zero
weights and zero bias adds exactly 0 to the stream: r2 + 0 + 0 = r2, in fp32
too. The copy is inserted after the block and every reader of r2 reads its
output. Its other weights are copies of the original block's, so the branch
starts as a trained block and only the zeroed projections hold it at zero.

The copy goes right after the residual addition, before any LayerNorm that
follows it, so post-norm blocks (BERT: r1 = LayerNorm(r + f(r))) get an exact
zero branch too. The block is the attention update and the MLP update
together when they pair up (a branch with a Softmax followed by one without),
else the single residual update the named layer writes into.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..analysis import Refusal, layer_name
from ..editor import GraphEditor
from ..ir import GraphIR
from ..ops import WEIGHTED_LAYERS

#: Ops a branch may end with after its last layer (bias, dropout, casts, and
#: the reshapes around a Gemm on flattened tokens): zero in, zero out.
_LAYOUT = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
_BRANCH_TAIL = frozenset({"Add", "Dropout", "Identity", "Cast", "Mul"}) | _LAYOUT


@dataclass
class Block:
    start: str          # the stream tensor entering the block
    end: str            # the stream tensor leaving it
    end_node: int       # the residual Add producing `end`
    nodes: list[int]    # the block's nodes, in topological order
    zeroed: list[int]   # the layers that end each branch


def plan_block(ir: GraphIR, layer: int) -> Block:
    """The residual block that `layer`'s branch writes into: its attention and
    MLP residual updates together when they pair up (attention, then MLP),
    else that one update."""
    add, branch = _residual_add_after(ir, layer)
    adds = [(add, 1 - branch)]
    if _branch_has(ir, add, 1 - branch, "Softmax"):
        following = _next_residual(ir, add)
        if following is not None and not _branch_has(ir, *following, "Softmax"):
            adds.append(following)
    else:
        previous = ir.producer_node(ir.nodes[add].input[1 - branch])
        port = _stream_operand(ir, previous) if previous is not None and ir.nodes[previous].op_type == "Add" else None
        if port is not None and _branch_has(ir, previous, port, "Softmax"):
            adds.insert(0, (previous, port))
    first, first_port = adds[0]
    last = adds[-1][0]
    start, end = ir.nodes[first].input[first_port], ir.nodes[last].output[0]
    if end in ir.graph_outputs:
        raise Refusal.not_deepenable(f"the block's output '{end}' is a graph output")
    if any(use.port < 0 for use in ir.uses(end)):
        raise Refusal.not_deepenable(f"the block's output '{end}' is read inside a subgraph")
    zeroed = [_branch_layer(ir, ir.nodes[node].input[1 - port]) for node, port in adds]
    return Block(start, end, last, _between(ir, start, last), zeroed)


def _next_residual(ir: GraphIR, add: int) -> tuple[int, int] | None:
    """The residual Add that continues the stream after `add` (node, stream port)."""
    stream = ir.nodes[add].output[0]
    for use in ir.uses(stream):
        node = ir.nodes[use.node]
        if node.op_type == "Add" and _reaches(ir, stream, node.input[1 - use.port]):
            return use.node, use.port
    return None


def _branch_has(ir: GraphIR, add: int, stream_port: int, op: str) -> bool:
    nodes = _between(ir, ir.nodes[add].input[stream_port], add)
    return any(ir.nodes[node].op_type == op for node in nodes)


def _residual_add_after(ir: GraphIR, layer: int) -> tuple[int, int]:
    tensor = ir.nodes[layer].output[0]
    for _ in range(8):
        uses = ir.uses(tensor)
        if len(uses) != 1:
            break
        node = ir.nodes[uses[0].node]
        if node.op_type == "Add" and not ir.is_const(node.input[1 - uses[0].port]):
            other = node.input[1 - uses[0].port]
            if _reaches(ir, other, tensor):
                return uses[0].node, uses[0].port
            break
        if node.op_type not in _BRANCH_TAIL:
            break
        tensor = node.output[0]
    raise Refusal.not_deepenable("it is not the last layer of a branch added to a residual stream")


def _stream_operand(ir: GraphIR, add: int) -> int | None:
    """The port of an Add's stream operand: the one the other is computed from."""
    node = ir.nodes[add]
    for port in (0, 1):
        if _reaches(ir, node.input[port], node.input[1 - port]):
            return port
    return None


def _reaches(ir: GraphIR, source: str, target: str) -> bool:
    """Whether tensor `target` is computed from tensor `source`."""
    producer = ir.producer_node(target)
    if producer is None:
        return False
    readers = {use.node for use in ir.uses(source)}
    ancestors = ir.ancestors(producer) | {producer}
    return bool(readers & ancestors)


def _between(ir: GraphIR, start: str, end_node: int) -> list[int]:
    readers = {use.node for use in ir.uses(start)}
    descendants = set(readers)
    for reader in readers:
        descendants |= ir.descendants(reader)
    ancestors = ir.ancestors(end_node) | {end_node}
    order = {node: position for position, node in enumerate(ir.topological_order())}
    return sorted(descendants & ancestors, key=order.__getitem__)


def _branch_layer(ir: GraphIR, tensor: str) -> int:
    """The weighted layer a branch ends with (through its bias and dropout)."""
    for _ in range(8):
        producer = ir.producer_node(tensor)
        if producer is None:
            break
        node = ir.nodes[producer]
        if node.op_type in WEIGHTED_LAYERS and len(node.input) > 1 and ir.is_const(node.input[1]):
            return producer
        if node.op_type not in _BRANCH_TAIL:
            break
        data = node.input[:1] if node.op_type in _LAYOUT else [n for n in node.input if n and not ir.is_const(n)]
        if len(data) != 1:
            break
        tensor = data[0]
    raise Refusal.not_deepenable(f"the branch ending in '{tensor}' does not end with a weighted layer")


def insert_block(ir: GraphIR, block: Block, prefix_base: str, fresh_seed: int | None = None) -> dict:
    """Insert the zero-output copy of `block` after it.

    With `fresh_seed`, the copy is a fresh block instead: the same structure,
    layer weights drawn anew (normal, with the std of the weight they
    replace), biases zero, LayerNorm scales one and shifts zero. Constants
    that are not parameters (shapes, masks, scales) are copied as they are.
    """
    edit = GraphEditor(ir)
    prefix = edit.fresh_prefix(f"{prefix_base}/block")
    renamed = {block.start: block.end}
    zero_inputs = set()
    for layer in block.zeroed:
        node = ir.nodes[layer]
        zero_inputs |= {name for name in node.input[1:] if name}
        bias = _bias_after(ir, layer)
        if bias:
            zero_inputs.add(bias)
    fresh = _fresh_values(ir, block, np.random.default_rng(fresh_seed)) if fresh_seed is not None else {}
    copies, initializers = [], {}
    for index in block.nodes:
        node = ir.nodes[index]
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        original = node.name or f"{node.op_type}_{index}"
        copy.name = prefix + ("" if original.startswith("/") else "/") + original
        for port, name in enumerate(copy.input):
            if name in renamed:
                copy.input[port] = renamed[name]
            elif name in ir.initializers or _is_parameter(ir, name):
                new_name = prefix + ("" if name.startswith("/") else "/") + name
                if new_name not in initializers:
                    value = fresh.get(name, ir.const_value(name))
                    if name in zero_inputs:
                        value = np.zeros_like(value)
                    initializers[new_name] = numpy_helper.from_array(value, new_name)
                copy.input[port] = new_name
        for port, name in enumerate(copy.output):
            if name:
                renamed[name] = prefix + ("" if name.startswith("/") else "/") + name
                copy.output[port] = renamed[name]
        copies.append(copy)
    with edit:
        edit.redirect_uses(block.end, renamed[block.end])
        edit.insert_before(block.end_node + 1, copies)
        edit.add_initializers(initializers.values())
    return {"after": block.end, "mode": "fresh-block" if fresh_seed is not None else "block",
            "activation": "fresh block" if fresh_seed is not None else "block copy",
            "nodes": [c.name for c in copies], "initializers": list(initializers),
            "zeroed": [layer_name(ir, layer) for layer in block.zeroed]}


def _fresh_values(ir: GraphIR, block: Block, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """New values for the parameters the block's nodes read (see insert_block)."""
    values = {}
    for index in block.nodes:
        node = ir.nodes[index]
        for port, name in enumerate(node.input):
            if not (name in ir.initializers or _is_parameter(ir, name)) or name in values:
                continue
            value = ir.const_value(name)
            if not np.issubdtype(value.dtype, np.floating) or value.ndim == 0:
                continue
            if node.op_type in WEIGHTED_LAYERS and port == 1:
                std = float(value.std()) or 0.02
                values[name] = rng.normal(0.0, std, size=value.shape).astype(value.dtype)
            elif node.op_type == "LayerNormalization" and port in (1, 2):
                values[name] = (np.ones_like if port == 1 else np.zeros_like)(value)
            elif node.op_type == "Gemm" and port == 2 or _is_bias_add(ir, index, port):
                values[name] = np.zeros_like(value)
    return values


def _is_parameter(ir: GraphIR, name: str) -> bool:
    """A float constant reached through Identity (exporters share equal
    initializers that way): the copy gets its own, like any other weight."""
    if not name or not ir.is_const(name):
        return False
    value = ir.const_value(name)
    return value is not None and np.issubdtype(value.dtype, np.floating) and value.ndim > 0


def _is_bias_add(ir: GraphIR, index: int, port: int) -> bool:
    """A constant added to a weighted layer's output."""
    node = ir.nodes[index]
    if node.op_type != "Add" or len(node.input) != 2:
        return False
    producer = ir.producer_node(node.input[1 - port])
    return producer is not None and ir.nodes[producer].op_type in WEIGHTED_LAYERS


def _bias_after(ir: GraphIR, layer: int) -> str | None:
    uses = ir.uses(ir.nodes[layer].output[0])
    if len(uses) == 1:
        node = ir.nodes[uses[0].node]
        if node.op_type == "Add" and ir.is_const(node.input[1 - uses[0].port]):
            return node.input[1 - uses[0].port]
    return None
