"""Widen a channel routing region (channel shuffles; see onnx_net2net.analysis.routing).

With the assignment source_k(j) (new slot j of writer k carries old channel
source_k(j), or nothing when -1):

* writers copy:           W'_k[j] = W_k[source_k(j)] (a slot carrying nothing
                          copies channel 0: it is read with weight 0)
* per-channel ops on a region tensor T (BatchNormalization, depthwise Conv):
                          p'[t] = p[position in T of the old label at t]
* readers of T split:     V'[:, t] = V[:, position of that label] * a_t, with
                          the a_t of the copies of one label summing to one
                          (1/count for `split="equal"`, random for
                          "random", 1/count plus noise centred over the
                          copies for "zero-sum"), and 0 where t carries nothing.
* constants that count channels (reshape dims, split sizes, slice bounds)
  take their values at the new width; dynamic ones follow by themselves.

Every reader sees each old channel's value at least once with weights that
sum to the old weight, so its output is unchanged.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..analysis.routing import RoutedGroup, assign
from ..analysis.routing_simulation import (
    LABEL_BASE,
    label_of,
    scaled_constant,
    simulate,
)
from ..editor import GraphEditor
from ..ir import GraphIR, node_attr
from ..options import Init, Split
from .wider import GrownGroup, WidenOptions, random_fractions


def widen_routed(ir: GraphIR, group: RoutedGroup, width: int, options: WidenOptions,
                 layer_names: list[str]) -> GrownGroup:
    region = group.region
    rng = np.random.default_rng(options.seed)
    edit = GraphEditor(ir)
    new = group.routings.get(width) or simulate(ir, region, width)
    source = assign(group, new, width, rng, replicate=options.init != Init.ZERO).source
    old_labels = group.old_routing.labels
    values = {}
    for number, writer in enumerate(region.writers):
        chosen = np.maximum(source[number], 0)
        node = ir.nodes[writer]
        axis = 0 if node.op_type == "Conv" or node_attr(node, "transB", 0) else 1
        values[(writer, 1)] = np.take(ir.const_value(node.input[1]), chosen, axis=axis)
        if len(node.input) > 2 and node.input[2]:
            bias = ir.const_value(node.input[2])
            if bias.shape[-1] == region.width:
                values[(writer, 2)] = np.take(bias, chosen, axis=bias.ndim - 1)
    for index, tensor in region.per_channel_tensors(ir).items():
        positions = _old_positions(old_labels[tensor], new.labels[tensor], source)
        node = ir.nodes[index]
        ports = (1, 2, 3, 4) if node.op_type == "BatchNormalization" else (1, 2)
        for port in ports:
            if port < len(node.input) and node.input[port]:
                values[(index, port)] = np.take(ir.const_value(node.input[port]), np.maximum(positions, 0), axis=0)
        if node.op_type == "Conv":
            edit.add_to_attribute(node, "group", len(positions) - int(node_attr(node, "group", 1)))
    for index, port in region.readers:
        tensor = ir.nodes[index].input[port]
        weight = values.get((index, 1), ir.const_value(ir.nodes[index].input[1]))  # a writer too: rows first
        values[(index, 1)] = _split_reader(ir, index, weight, old_labels[tensor], new.labels[tensor], source,
                                           options, rng)
    for index in region.routing:
        node = ir.nodes[index]
        if node.op_type not in ("Reshape", "Split", "Slice"):
            continue
        for port in range(1, len(node.input)):
            if node.input[port] and ir.is_const(node.input[port]):
                values[(index, port)] = scaled_constant(ir, index, port, region.width, width)
    weights = edit.store_constants(values)
    edit.commit()  # nothing is queued today; a later insertion must not be lost
    return GrownGroup(layers=layer_names, old_width=region.width, new_width=width, tensors=sorted(region.tensors),
                      weights=weights)


def _old_positions(old: np.ndarray, new: np.ndarray, source: dict) -> np.ndarray:
    """For each position of the new tensor, the old position holding the same
    channel (-1 where the new position carries nothing)."""
    where = {int(label): position for position, label in enumerate(old)}
    positions = np.full(len(new), -1, dtype=np.int64)
    for position, slot in enumerate(new):
        label = _source_label(int(slot), source)
        if label is not None:
            positions[position] = where[label]
    return positions


def _source_label(slot_label: int, source: dict) -> int | None:
    number, slot = divmod(slot_label - 1, LABEL_BASE)
    channel = int(source[number][slot])
    return None if channel < 0 else label_of(number, channel)


def _split_reader(ir: GraphIR, index: int, weight: np.ndarray, old: np.ndarray, new: np.ndarray, source: dict,
                  options: WidenOptions, rng: np.random.Generator) -> np.ndarray:
    node = ir.nodes[index]
    axis = 1 if node.op_type == "Conv" or node_attr(node, "transB", 0) else 0
    positions = _old_positions(old, new, source)
    columns = np.take(weight, np.maximum(positions, 0), axis=axis).astype(np.float64)
    noise_std = options.zero_sum_scale * float(np.std(weight)) if weight.size else 0.0
    moved = np.moveaxis(columns, axis, 0)
    copies = defaultdict(list)
    for position, old_position in enumerate(positions):
        if old_position < 0:
            moved[position] = 0
        else:
            copies[int(old_position)].append(position)
    for group in copies.values():
        if len(group) == 1:
            continue
        if options.split == Split.RANDOM:
            fractions = random_fractions(rng, (len(group),) + moved.shape[1:])
        else:
            fractions = np.full((len(group),) + moved.shape[1:], 1.0 / len(group))
        moved[group] = moved[group] * fractions
        if noise_std:
            draws = rng.normal(0.0, noise_std, size=(len(group),) + moved.shape[1:])
            moved[group] += draws - draws.mean(axis=0, keepdims=True)
    return np.moveaxis(moved, 0, axis).astype(weight.dtype)
