"""Rules for Concat, Split and Slice: the units at an offset of a longer axis.

Along the unit axis, Concat puts each input at the offset of the sizes
before it (`offset + k`). Inputs aligned with each other (aligned.py) hold
the same units: the output holds the space once per such input (outer k
when they are all the inputs, else at each one's start: `starts`). Split
and Slice take a range [start, end) that must hold all the units (or none
of them): the units then sit at `offset - start`. Once q - n units are
added, constants that count positions move: split sizes grow by the
placement's growth per unit, and Slice bounds after the units move right by
it (bounds counted from the end move by themselves, except those before the
units).

Slice bounds read at run time on the unit axis (`chunk(2, -1)` exported as
Shape -> Div -> Slice) act as the bounds they hold now, when the model fixes
them; runtime_shapes then checks that they move as constant bounds would
(and feeds the right values where they do not).

A space repeated k times (q | k | v of a fused projection, or Swin's patch
merging of strided slices) is split into, sliced from or concatenated to
its repeats whole: every repeat holds the same units. A space repeated in
some parts of a Split only (q and k of EfficientViT's q | k | v, v holding
another space) is split into its repeats; a refused split, slice or
concatenation of the seed's units suggests layouts of a space in some parts
only (`Refusal.parts`, listed by part_layouts.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np

from ...ir import GraphIR, node_attr
from ..aligned import aligned_inputs, chunked_source
from ..refined_shapes import refined_shape
from ..part_layouts import part_layouts, seed_parts, slice_parts
from ..shape_algebra import clamp
from ..size_evaluator import SizeEvaluator
from ..units import Placement, ValueEdit
from ..walk import Walk


def concat(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Along the unit axis: the units at the offset of the inputs before them."""
    ir = walk.ir
    node = ir.nodes[index]
    rank = placement.rank
    axis = node_attr(node, "axis") % rank
    if axis != placement.axis:
        walk.same_on_ports(index, placement, inputs=range(len(node.input)))
        return
    if _concat_of_one_space(walk, index, side, placement):
        return
    sizes = [walk.dim(index, name, axis) for name in node.input]
    if any(size is None for size in sizes):
        walk.refuse(index, "an input's size on the concatenation axis is unknown")
    if side == "in" and len(sizes) > 1 and set(sizes) == {placement.length} and not placement.starts:
        walk.settle(("concat", index), lambda: _settle_equal_inputs(walk, index, sizes), late=True)
        return
    if _concat_of_aligned(walk, index, side, port, placement, sizes):
        return
    _concat_at_offset(walk, index, side, port, placement, sizes)


def _concat_at_offset(walk: Walk, index: int, side: str, port: int, placement: Placement, sizes: list) -> None:
    """The units of one input, at that input's offset in the output."""
    ir = walk.ir
    node = ir.nodes[index]
    if placement.outer != 1:
        walk.refuse(index, "concatenation of interleaved features")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    total = int(starts[-1])
    if side == "in":
        walk.add(node.output[0], replace(placement, offset=placement.offset + int(starts[port]), length=total))
        return
    lo, hi = placement.offset, placement.offset + walk.group.size * placement.inner
    for source, name in enumerate(node.input):
        if starts[source] <= lo and hi <= starts[source + 1]:
            walk.add(name, replace(placement, offset=lo - int(starts[source]), length=sizes[source]))
            return
    # Equal inputs aligned with each other, or with chunks of one tensor, may hold the same units:
    # the layout with the space once per input is worth a walk.
    fills = lo == 0 and hi == total and len(set(sizes)) == 1 and len(node.input) > 1
    repeated = fills and (len(aligned_inputs(ir, index, 0, placement.axis)) == len(node.input)
                          or chunked_source(ir, list(node.input), placement.axis) is not None)
    walk.refuse(index, "the units span several concatenated inputs", ((1, len(node.input)),) if repeated else (),
                parts=seed_parts(walk, placement, starts))


def _settle_equal_inputs(walk: Walk, index: int, sizes: list) -> None:
    """Inputs of equal size, decided once the walk has reached all it can:
    those that carry the units in one same placement hold the same units
    (EdgeNeXt's concat(conv(x[:, :c]), x[:, c:]), where x holds the space
    twice over), so the output holds it once per such input, like aligned
    inputs; a single carrier is at its input's offset."""
    node = walk.ir.nodes[index]
    placements = walk.group.placements
    carriers = [port for port, name in enumerate(node.input) if name in placements]
    shared = {placements[node.input[port]] for port in carriers}
    if len(carriers) > 1 and len(shared) == 1:
        placement = shared.pop()
        if len(carriers) == len(sizes):
            walk.add(node.output[0], replace(placement, outer=placement.outer * len(sizes),
                                             length=placement.length * len(sizes)))
            return
        if placement.outer != 1 or placement.starts:
            walk.refuse(index, "the same units repeat in some of its inputs, and inside each of them too")
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        walk.add(node.output[0], replace(placement, starts=tuple(int(offsets[c]) for c in carriers),
                                         length=int(offsets[-1])))
        return
    for port in carriers:
        _concat_at_offset(walk, index, "in", port, placements[node.input[port]], sizes)


def _concat_of_aligned(walk: Walk, index: int, side: str, port: int, placement: Placement, sizes: list) -> bool:
    """Aligned inputs (aligned.py: GhostNet's concat(x, depthwise(x)), DLA's
    concat(relu(f(x) + x), x)) hold the same units: the output holds the
    space once per input (outer times the inputs), or, with other inputs
    between or after them, once per aligned input at its start (`starts`).
    Reached from the output, each repeat gives its input the units."""
    if side == "out":
        return _aligned_from_output(walk, index, placement, sizes)
    if placement.starts:
        walk.refuse(index, "the units already repeat at uneven offsets of another concatenation")
    carriers = aligned_inputs(walk.ir, index, port, placement.axis)
    if len(carriers) == 1 or len({sizes[c] for c in carriers}) != 1:
        return False
    node = walk.ir.nodes[index]
    for carrier in carriers:
        walk.add(node.input[carrier], placement)
    if len(carriers) == len(sizes):
        walk.add(node.output[0], replace(placement, outer=placement.outer * len(sizes),
                                         length=placement.length * len(sizes)))
        return True
    if placement.outer != 1:
        walk.refuse(index, "the same units repeat in some of its inputs, and inside each of them too")
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    walk.add(node.output[0], replace(placement, starts=tuple(int(offsets[c]) for c in carriers),
                                     length=int(offsets[-1])))
    return True


def _aligned_from_output(walk: Walk, index: int, placement: Placement, sizes: list) -> bool:
    """The output holds the space once per input (outer a multiple of the
    inputs), or at the starts of some inputs: each of them holds it."""
    node = walk.ir.nodes[index]
    offsets = [int(o) for o in np.concatenate([[0], np.cumsum(sizes)])]
    if placement.starts:
        carriers = [offsets.index(start) for start in placement.starts if start in offsets[:-1]]
        if len(carriers) != len(placement.starts) or len({sizes[c] for c in carriers}) != 1:
            walk.refuse(index, "the units repeat at uneven offsets that are not the starts of its inputs")
        for carrier in carriers:
            walk.add(node.input[carrier], replace(placement, starts=(), length=sizes[carrier]))
        return True
    count = len(sizes)
    if placement.outer % count or len(set(sizes)) != 1 or placement.length != sizes[0] * count:
        return False
    for name in node.input:
        walk.add(name, replace(placement, outer=placement.outer // count, length=sizes[0]))
    return True


def _concat_of_one_space(walk: Walk, index: int, side: str, placement: Placement) -> bool:
    """Swin's patch merging: strided slices of one tensor (all slicing other
    axes) concatenated along the unit axis hold the same units k times: the
    output is the space repeated k times (outer = k)."""
    ir = walk.ir
    node = ir.nodes[index]
    roots = {_slice_root(ir, name, placement.axis) for name in node.input}
    if len(node.input) < 2 or len(roots) != 1 or None in roots:
        return False
    # Slices that do not touch the unit axis keep its length (also where shape inference lost it).
    shapes = [ir.shape(name) for name in node.input]
    length = placement.length if side == "in" else placement.block
    sizes = {length if shape is None or shape[placement.axis] is None else shape[placement.axis] for shape in shapes}
    count = len(node.input)
    if side == "in":
        if placement.outer != 1 or sizes != {placement.length}:
            return False
        for name in node.input:
            walk.add(name, placement)
        walk.add(node.output[0], replace(placement, outer=count, length=placement.length * count))
        return True
    if placement.outer != count or sizes != {placement.block}:
        return False
    for name in node.input:
        walk.add(name, replace(placement, outer=1, length=placement.block))
    return True


def _slice_root(ir: GraphIR, tensor: str, unit_axis: int) -> str | None:
    """The tensor a chain of Slices (none on `unit_axis`) starts from, or None."""
    producer = ir.producer_node(tensor)
    if producer is None or ir.nodes[producer].op_type != "Slice":
        return None
    while producer is not None and ir.nodes[producer].op_type == "Slice":
        node = ir.nodes[producer]
        axes = ir.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        rank = ir.rank(node.input[0])
        if axes is None or rank is None or unit_axis in [int(a) % rank for a in axes]:
            return None
        tensor = node.input[0]
        producer = ir.producer_node(tensor)
    return tensor


def split(walk: Walk, index: int, side: str, port: int, placement: Placement, settled: bool = False) -> None:
    """Along the unit axis: the output holding the units (or every output of a repeated space); its sizes
    grow. `settled`: a decision deferred until the walk reached all it could (Walk.settle) is being taken."""
    ir = walk.ir
    node = ir.nodes[index]
    axis = node_attr(node, "axis", 0) % placement.rank
    if axis != placement.axis:
        walk.same_on_ports(index, placement, outputs=range(len(node.output)))
        return
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its split sizes")
    sizes = [walk.dim(index, name, axis) for name in node.output]
    if any(size is None for size in sizes):
        walk.refuse(index, "an output's size on the split axis is unknown")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    source = ir.nodes[index].input[0]
    known = walk.group.placements.get(source)
    if side == "out" and known is not None and _split_pieces(walk, index, known, sizes, starts).get(port) == placement:
        return  # reached again from a piece of a repeated space already mapped from the input
    if side == "out" and placement.starts:
        walk.refuse(index, "the units repeat at uneven offsets of one of its outputs")
    if side == "out" and known is None and len(set(sizes)) == 1 and len(sizes) > 1 and not settled:
        # The input may hold the space once per output: decide once the rest of the walk has said.
        walk.settle(("split", index), lambda: _settle_split(walk, index))
        return
    if side == "out" and known is None and all(walk.group.placements.get(name) == placement for name in node.output):
        # Every output holds the units alike (settled): the input holds the space once per output.
        walk.add(source, replace(placement, outer=placement.outer * len(sizes), length=int(starts[-1])))
        return
    if side == "out":
        walk.add(source, replace(placement, offset=placement.offset + int(starts[port]), length=int(starts[-1])))
        _split_size_edits(walk, index, {port: placement}, sizes)
        return
    pieces = _split_pieces(walk, index, placement, sizes, starts)
    for piece, piece_placement in pieces.items():
        walk.add(node.output[piece], piece_placement)
    _split_size_edits(walk, index, pieces, sizes)


def _settle_split(walk: Walk, index: int) -> None:
    """The deferred decision of a Split reached from its outputs: every output
    that carries the units is decided (the first may find that they all hold
    them alike: the input holds the space once per output; otherwise each one
    places the units at its offset of the input, and two conflict)."""
    node = walk.ir.nodes[index]
    for port, name in enumerate(node.output):
        if name in walk.group.placements:
            split(walk, index, "out", port, walk.group.placements[name], settled=True)


def _split_pieces(walk: Walk, index: int, placement: Placement, sizes: list, starts) -> dict[int, Placement]:
    """The outputs of a Split that carry the units, with their placements:
    the one output holding all of them, or, for a space repeated once per
    output (q | k | v of a fused projection), every output."""
    if placement.starts:
        return _pieces_of_uneven_repeats(walk, index, placement, sizes, starts)
    lo, hi = placement.offset, placement.offset + walk.group.size * placement.inner
    if placement.outer == 1:
        for piece in range(len(sizes)):
            if starts[piece] <= lo and hi <= starts[piece + 1]:
                return {piece: replace(placement, offset=lo - int(starts[piece]), length=sizes[piece])}
    per_piece, uneven = divmod(placement.outer, len(sizes))
    if not uneven and all(size == placement.block * per_piece for size in sizes):
        return {piece: replace(placement, outer=per_piece, length=size) for piece, size in enumerate(sizes)}
    fills_blocks = placement.offset == 0 and hi == placement.block
    equal = len(set(sizes)) == 1 and placement.block % len(sizes) == 0
    retry = ((1, len(sizes)),) if fills_blocks and placement.outer == 1 and equal else ()
    unequal = f" (of unequal sizes {', '.join(map(str, sizes))})" \
        if fills_blocks and placement.outer == 1 and len(set(sizes)) > 1 else ""
    group = walk.group
    plain_seed = (fills_blocks and placement.outer == 1 and placement.inner == 1 and group.unit_width == 1
                  and group.repeats == 1 and placement.length == group.size)
    walk.refuse(index, f"the units span several split outputs{unequal}", retry,
                parts=part_layouts(sizes, starts) if plain_seed else seed_parts(walk, placement, starts))


def _pieces_of_uneven_repeats(walk: Walk, index: int, placement: Placement, sizes: list,
                              starts) -> dict[int, Placement]:
    """The outputs holding the repeats of a space at uneven offsets (q and k
    of q | k | v): each repeat must lie in one output, which then holds it
    (or the repeats it holds, at their offsets in it)."""
    held = defaultdict(list)
    span = walk.group.size * placement.inner
    for start in placement.starts:
        lo = start + placement.offset
        pieces = [piece for piece in range(len(sizes)) if starts[piece] <= lo and lo + span <= starts[piece + 1]]
        if not pieces:
            walk.refuse(index, f"a repeat of the units (positions {lo} to {lo + span}) spans several split outputs")
        held[pieces[0]].append(start - int(starts[pieces[0]]))
    pieces = {}
    for piece, offsets in held.items():
        if len(offsets) == 1:
            pieces[piece] = replace(placement, offset=placement.offset + offsets[0], starts=(), length=sizes[piece])
        else:
            pieces[piece] = replace(placement, starts=tuple(offsets), length=sizes[piece])
    return pieces


def _split_size_edits(walk: Walk, index: int, pieces: dict[int, Placement], sizes: list) -> None:
    """Grow the sizes of the outputs that gain units (an even split of a space
    repeated alike in every output stays even by itself; an even split whose
    outputs grow unequally is given explicit sizes)."""
    node = walk.ir.nodes[index]
    if len(node.input) > 1 and node.input[1]:
        walk.const(index, node.input[1], "split sizes")
    elif node_attr(node, "split") is not None:
        walk.refuse(index, "its split sizes are an attribute (opset < 13); re-export at opset 13 or later")
    elif len(pieces) == len(node.output) and len({placement.growth() for placement in pieces.values()}) == 1:
        return
    elif walk.ir.opset < 13:
        walk.refuse(index, "it splits evenly and its outputs would grow unequally, and before opset 13 a Split "
                           "takes no sizes input; re-export at opset 13 or later")
    else:
        walk.group.even_splits[index] = tuple(int(size) for size in sizes)
    for piece, placement in pieces.items():
        walk.group.value_edits.append(ValueEdit(index, 1, piece, placement.growth()))


def slice_op(walk: Walk, index: int, side: str, port: int, placement: Placement) -> None:
    """Along the unit axis: a range holding all the units or none; bounds after them move."""
    ir = walk.ir
    node = ir.nodes[index]
    if side == "in" and port != 0:
        walk.refuse(index, "the units reach its slice bounds")
    if len(node.input) < 3:
        walk.refuse(index, "Slice with attribute bounds (opset < 10)")
    runtime = tuple(p for p in (1, 2) if not ir.is_const(node.input[p]))
    if not runtime:
        _slice(walk, index, side, placement, walk.const(index, node.input[1], "starts"),
               walk.const(index, node.input[2], "ends"))
        return
    bounds = _slice_with_runtime_bounds(walk, index, placement)
    if bounds is not None:
        edits = len(walk.group.value_edits)
        _slice(walk, index, side, placement, bounds[0], bounds[1])
        _runtime_bound_growth(walk, index, runtime, bounds[2], edits)


def _slice(walk: Walk, index: int, side: str, placement: Placement, starts, ends, settled: bool = False) -> None:
    """slice_op with the bounds' values (constant, or their values now); `settled`: a decision
    deferred until the walk reached all it could (Walk.settle) is being taken."""
    ir = walk.ir
    node = ir.nodes[index]
    rank = placement.rank
    axes = walk.const(index, node.input[3], "axes") if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
    steps = walk.const(index, node.input[4], "steps") if len(node.input) > 4 and node.input[4] else np.ones(len(starts))
    axes = [int(a) % rank for a in axes]
    if placement.axis not in axes:
        walk.same_on_ports(index, placement)
        return
    k = axes.index(placement.axis)
    if steps[k] != 1:
        walk.refuse(index, "it slices the unit axis with a step")
    in_length = placement.length if side == "in" else walk.dim(index, node.input[0], placement.axis)
    first, last = int(starts[k]), int(ends[k])
    start, end = clamp(first, in_length), clamp(last, in_length)
    growth = placement.growth()
    known = walk.group.placements.get(node.input[0])
    if side == "out" and known is not None and known.outer > 1:
        if _slice_of_repeats(walk, index, k, first, last, known, record=False) == placement:
            return  # reached again from one part of a repeated space already mapped from the input
    if side == "out" and known is not None and known.starts:
        if _kept_repeats(known, (start, end), walk.group.size * known.inner) == placement:
            return  # likewise, for repeats at uneven offsets
    if side == "out" and known is None and not settled and _one_of_equal_parts(start, end, in_length):
        # The input may hold the space once per part (reached from another part, or from elsewhere):
        # decide once the rest of the walk has said.
        walk.settle(("slice", index), lambda: _slice(walk, index, side, placement, starts, ends, settled=True))
        return
    if side == "out" and settled and known is None and _add_repeated_source(walk, index, placement, in_length):
        return
    if side == "out" and placement.outer > 1 and (start or end != in_length or in_length != placement.length):
        walk.refuse(index, f"it keeps positions [{start}, {end}) of {in_length}, and they hold the units "
                           f"{placement.outer} times over (the repeats of the input are unknown)")
    if side == "out":
        walk.add(node.input[0], replace(placement, offset=placement.offset + start, length=in_length))
        _shift_slice_bounds(walk, index, k, first, last, in_length, growth, True, False)
        return
    if placement.starts:
        _slice_of_uneven_repeats(walk, index, k, (first, last), (start, end), in_length, placement)
        return
    lo, hi = placement.offset, placement.offset + walk.group.size * placement.inner
    if placement.outer != 1:
        walk.add(node.output[0], _slice_of_repeats(walk, index, k, first, last, placement))
        return
    if start <= lo and hi <= end:
        walk.add(node.output[0], replace(placement, offset=lo - start, length=end - start))
        _shift_slice_bounds(walk, index, k, first, last, in_length, growth, True, False)
    elif end <= lo:
        # The slice lies before the units: only bounds counted from the end move.
        _shift_slice_bounds(walk, index, k, first, last, in_length, growth, True, True)
    elif hi <= start:
        # The slice lies after the units: it moves right with them.
        _shift_slice_bounds(walk, index, k, first, last, in_length, growth, False, False)
    else:
        span = end - start
        fills = lo == 0 and hi == placement.length
        retry = ((1, in_length // span),) if fills and _one_of_equal_parts(start, end, in_length) else ()
        unequal = (f" (it keeps positions [{start}, {end}) of {in_length}, which is not cut into equal parts of "
                   f"{span})") if fills and not retry and 0 < span < in_length else ""
        group = walk.group
        plain_seed = (fills and placement.inner == 1 and group.unit_width == 1 and group.repeats == 1
                      and placement.length == group.size)
        walk.refuse(index, f"it cuts through the units{unequal}", retry,
                    parts=slice_parts(walk.ir, index, placement.axis, (start, end), in_length)
                    if plain_seed and (unequal or retry) else ())


def _slice_of_uneven_repeats(walk: Walk, index: int, k: int, bounds: tuple[int, int], kept: tuple[int, int],
                             length: int, placement: Placement) -> None:
    """A range [start, end) of a tensor holding the space at uneven offsets
    (`starts`): every repeat lies inside or outside it; the output holds the
    repeats inside, and a bound moves by the units of the repeats before it
    (counted from the end: of those after it)."""
    start, end = kept
    span = walk.group.size * placement.inner
    repeats = [begin + placement.offset for begin in placement.starts]
    if any(lo < end and start < lo + span and not (start <= lo and lo + span <= end) for lo in repeats):
        walk.refuse(index, f"it keeps positions [{start}, {end}) of {length}, which cut a repeat of the units")
    output = _kept_repeats(placement, kept, span)
    if output is not None:
        walk.add(walk.ir.nodes[index].output[0], output)
    for port, value, position in ((1, bounds[0], start), (2, bounds[1], end)):
        if value < 0:
            per_unit = -placement.inner * sum(lo >= position for lo in repeats)
        elif value <= length:
            per_unit = placement.inner * sum(lo + span <= position for lo in repeats)
        else:
            per_unit = 0  # past the end: stays past it
        if per_unit:
            walk.group.value_edits.append(ValueEdit(index, port, k, per_unit))


def _kept_repeats(placement: Placement, kept: tuple[int, int], span: int) -> Placement | None:
    """Where the repeats (`starts`) inside [start, end) sit in the slice (None: none inside)."""
    start, end = kept
    inside = [begin + placement.offset - start for begin in placement.starts
              if start <= begin + placement.offset and begin + placement.offset + span <= end]
    if len(inside) == 1:
        return replace(placement, offset=inside[0], starts=(), length=end - start)
    return replace(placement, offset=0, starts=tuple(inside), length=end - start) if inside else None


def _add_repeated_source(walk: Walk, index: int, placement: Placement, length: int) -> bool:
    """Reached from a part of a tensor that is cut into k equal parts (EdgeNeXt's
    chunks), the rest of the walk found k Slices of it holding the units alike
    (k Slice nodes, not checked to be k different parts): the tensor holds the
    space once per part. The guess is checked: each Slice, visited again from
    the tensor, maps its own bounds, and a part read twice or not at all is
    still the same units in every repeat."""
    node = walk.ir.nodes[index]
    source = node.input[0]
    parts = length // placement.length if placement.length and length % placement.length == 0 else 0
    holders = {use.node for use in walk.ir.uses(source) if use.port == 0
               and walk.ir.nodes[use.node].op_type == "Slice"
               and walk.group.placements.get(walk.ir.nodes[use.node].output[0]) == placement}
    if parts < 2 or len(holders) != parts:
        return False
    walk.add(source, replace(placement, outer=placement.outer * parts, length=length))
    return True


def _one_of_equal_parts(start: int, end: int, length: int) -> bool:
    """Whether [start, end) is one of several equal parts of an axis of `length` (a chunk)."""
    span = end - start
    return 0 < span < length and length % span == 0 and start % span == 0


def _slice_with_runtime_bounds(walk: Walk, index: int, placement: Placement) -> tuple | None:
    """Bounds read at run time (`pos[:, :T]`) on other axes than the unit axis:
    the units pass; runtime_shapes checks the bounds do not change with them.
    On the unit axis (`chunk(2, -1)` exported as Shape -> Div -> Slice), the
    bounds' values now, when the model fixes them: (starts, ends, k), k the
    unit axis' entry; the slice then acts as one with those bounds."""
    node = walk.ir.nodes[index]
    if len(node.input) < 4 or not node.input[3]:
        walk.refuse(index, "its bounds are read at run time and its axes are implicit")
    axes = [int(a) % placement.rank for a in walk.const(index, node.input[3], "axes")]
    if placement.axis not in axes:
        walk.same_on_ports(index, placement)
        return None
    k = axes.index(placement.axis)
    evaluator = SizeEvaluator(walk.ir, {}, shape_of=lambda tensor: refined_shape(walk.ir, tensor))
    bounds = [evaluator.port_entries(index, port) for port in (1, 2)]
    if any(entries is None or len(entries) != len(axes) or entries[k].base is None for entries in bounds):
        walk.refuse(index, "it slices the unit axis with bounds read at run time (not fixed by the model)")
    return tuple(np.array([0 if e.base is None else e.base for e in entries]) for entries in bounds) + (k,)


def _runtime_bound_growth(walk: Walk, index: int, runtime: tuple[int, ...], k: int, first_edit: int) -> None:
    """The bounds edits recorded from `first_edit` on for ports read at run
    time become the growth those bounds must follow (runtime_shapes checks it
    and, where the computed bound does not follow, feeds the value)."""
    group = walk.group
    recorded = group.value_edits[first_edit:]
    group.value_edits[first_edit:] = [edit for edit in recorded if edit.port not in runtime]
    for port in runtime:
        growth = [edit.per_unit for edit in recorded if edit.port == port and edit.index == k]
        if growth:
            group.runtime_bounds[(index, port, k)] = sum(growth)
        else:
            group.runtime_bounds.setdefault((index, port, k), 0)


def _slice_of_repeats(walk: Walk, index: int, k: int, first: int, last: int, placement: Placement,
                      record: bool = True) -> Placement:
    """A Slice taking whole repeats of a repeated space (q, k or v of a fused
    projection): the output holds those repeats; bounds move by the growth of
    the repeats before them."""
    block, length, per_repeat = placement.block, placement.length, placement.inner
    if first < 0 or last < 0:
        walk.refuse(index, "it slices a repeated space with bounds counted from the end")
    start, end = min(first, length), min(last, length)
    if start % block or end % block or end <= start:
        walk.refuse(index, f"it cuts through the repeats of the units (it keeps positions [{start}, {end}) "
                           f"of {placement.outer} repeats of {block})")
    if record:
        if start:
            walk.group.value_edits.append(ValueEdit(index, 1, k, start // block * per_repeat))
        if last <= length:  # a larger end is clamped to the new length as well
            walk.group.value_edits.append(ValueEdit(index, 2, k, end // block * per_repeat))
    return replace(placement, outer=(end - start) // block, length=end - start)


def _shift_slice_bounds(walk: Walk, index: int, k: int, first: int, last: int, length: int, growth: int,
                        start_before_units: bool, end_before_units: bool) -> None:
    """Keep a Slice's bounds on the same data once `growth` positions per unit
    are inserted: a bound before the units keeps its absolute position, one
    after them moves right (bounds counted from the end move by themselves)."""
    for port, value, units_after in ((1, first, start_before_units), (2, last, end_before_units)):
        if value < 0 and not units_after:
            continue  # counted from the end, and the units are before it: moves by itself
        if value < 0:
            walk.group.value_edits.append(ValueEdit(index, port, k, -growth))
        elif not units_after and value <= length:
            walk.group.value_edits.append(ValueEdit(index, port, k, growth))
