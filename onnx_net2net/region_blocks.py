"""Block-by-block region verification: a large region run in pieces.

A group that spans the whole network (a transformer's residual stream, a
ResNet's stages) makes the changed region R the whole model. Running R in one
session holds all its weights at once. Instead R is cut into blocks along
*cut tensors*, and the blocks run one after the other, each in its own
session that is freed before the next one starts.

The cut
-------
Take R's nodes in the reference's (topological) order. After node k the
*live* tensors are those produced by R at or before k and read by R after k.
A cut after k is valid when

* every live tensor is also produced in the candidate's R (same name), and
* the candidate's nodes needed for the block's targets (the next cut's live
  tensors and R's boundary outputs produced in the block), searched upstream
  from the targets and stopping at the previous cut's tensors and R's boundary
  inputs, read nothing else that R produces.

Blocks are closed greedily once they hold `block_bytes` of weights, so a
session holds about one block's weights (plus the live activations).

Why it proves what the whole region proves
------------------------------------------
Block k runs on the values the earlier blocks really produced (the
reference's block on the reference's values, the candidate's block on the
candidate's values), and R's boundary inputs get the same values as in a
whole-region run. Composed, the blocks compute exactly R_old(x) and R_new(x):
the verdict compares R's boundary outputs as the whole-region check does.

The expansion map at the cuts
-----------------------------
At a cut tensor whose width grew, the candidate's value should be E(old), E
the stream's expansion map along the grown axis (n old units -> q new ones):

* tiling (Net2Net replication, multiples): new unit j = old unit m[j], m a
  unit mapping that uses every old unit;
* LEMON's average expansion: the copies as above, and each extra unit carries
  the mean over the old units (zero instead for RMSNorm's variant).

Each grown block then satisfies block_new(E(x)) = E(block_old(x)). The map is
inferred from the values at each cut and reported ("tiling 64 -> 96", "+ 2
mean units") as a diagnostic that localises a failure to its first block; a
cut whose values are not such an expansion is reported, not failed, because
later blocks may still agree (e.g. units that no reader uses).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import io
from .errors import UserError
from .region_diff import IndexedGraph, Region, RegionUnavailable, node_inputs
from .region_extract import extract
from .sessions import make_session, run_session
from .verification import OutputComparison, compare_arrays, ours, tolerance_for

#: A block is closed once it holds this many bytes of weights.
BLOCK_WEIGHT_BYTES = 256 << 20


@dataclass
class Block:
    """One piece of the region: its nodes in each graph and what crosses its edges."""

    old_nodes: list[int]
    new_nodes: list[int]
    cut_in: list[str]                 # live tensors entering from the previous block
    cut_out: list[str]                # live tensors leaving for the next block
    outputs: list[str]                # R's boundary outputs produced in this block
    weight_bytes: int = 0


@dataclass
class BlockRun:
    """What running the blocks found: R's outputs compared, the maps at the cuts."""

    outputs: list[OutputComparison]
    blocks: list[Block]
    expansions: dict[str, str] = field(default_factory=dict)
    provider: str = ""

    def notes(self) -> list[str]:
        largest = max(b.weight_bytes for b in self.blocks) / 2**20
        counts = Counter(self.expansions.values())
        cuts = "; ".join(f"{count} x {what}" for what, count in sorted(counts.items(), key=lambda c: -c[1]))
        return [f"region verified block by block: {len(self.blocks)} block(s), the largest holding "
                f"{largest:.1f} MiB of weights" + (f"; cut tensors, candidate vs reference: {cuts}" if cuts else "")]


def plan_blocks(old: io.ModelHandle, new: io.ModelHandle, region: Region, block_bytes: int) -> list[Block]:
    """Cut the region into blocks of about `block_bytes` of weights (one block if it cannot be cut)."""
    g_old, g_new = IndexedGraph.of(old), IndexedGraph.of(new)
    produced_new = {o for i in region.new_nodes for o in g_new.nodes[i].output if o}
    lives = _live_sets(g_old, region.old_nodes)
    rejected: set[int] = set()
    while True:
        cuts = _choose_cuts(g_old, region, lives, produced_new, block_bytes, rejected)
        blocks, bad_cut = _partition(g_old, g_new, region, cuts)
        if bad_cut is None:
            return blocks
        rejected.add(bad_cut)


def _choose_cuts(graph: IndexedGraph, region: Region, lives: list[set[str]], produced_new: set[str],
                 block_bytes: int, rejected: set[int]) -> list[tuple[int, list[str]]]:
    """Positions in the region's order after which to cut, with their live tensors.

    A block closes once it holds `block_bytes` of weights, at the next valid
    position whose live set is about as small as any in the region (between a
    transformer's blocks: the stream alone), or at any valid position once it
    holds four times that."""
    order = region.old_nodes
    smallest = min((len(live) for live in lives[:-1] if live), default=0)
    cuts, weights, counted = [], 0, set()
    for k, index in enumerate(order[:-1]):
        for name in node_inputs(graph.nodes[index]):
            if name in graph.inits and name not in counted:
                counted.add(name)
                weights += io.tensor_nbytes(graph.inits[name])
        live = lives[k]
        if weights < block_bytes or not live or not live <= produced_new or k in rejected:
            continue
        if len(live) <= smallest + 1 or weights >= 4 * block_bytes:
            cuts.append((k, sorted(live)))
            weights = 0
    return cuts


def _live_sets(graph: IndexedGraph, order: list[int]) -> list[set[str]]:
    """For each position k of the region's order: the tensors produced at or before k and read after k."""
    position = {index: k for k, index in enumerate(order)}
    last_use: dict[str, int] = {}
    for k, index in enumerate(order):
        for name in node_inputs(graph.nodes[index]):
            if graph.producer.get(name) in position:
                last_use[name] = max(last_use.get(name, -1), k)
    lives, live = [], set()
    for k, index in enumerate(order):
        live = {n for n in live if last_use[n] > k}
        live.update(o for o in graph.nodes[index].output if o and last_use.get(o, -1) > k)
        lives.append(live)
    return lives


def _partition(g_old: IndexedGraph, g_new: IndexedGraph, region: Region, cuts: list[tuple[int, list[str]]]
               ) -> tuple[list[Block], int | None]:
    """The blocks for these cuts, or the position of a cut to drop (the candidate's graph does not split there)."""
    old_order, boundary = region.old_nodes, set(region.inputs)
    region_outputs = set(region.outputs)
    unassigned, assigned = set(region.new_nodes), set()
    blocks, start, cut_in = [], 0, []
    for end, cut_out in cuts + [(len(old_order) - 1, [])]:
        old_nodes = old_order[start:end + 1]
        last = not cut_out
        outputs = [o for i in old_nodes for o in g_old.nodes[i].output if o in region_outputs]
        if last:
            outputs = sorted(region_outputs - {o for block in blocks for o in block.outputs})
        new_nodes, needed = _upstream(g_new, cut_out + outputs, stop=set(cut_in) | boundary, allowed=unassigned)
        if new_nodes is None:
            if not cuts:
                raise RegionUnavailable("the candidate's region does not compute its outputs from the same "
                                        "boundary")
            if cut_in and (last or needed in assigned):
                # a node of an earlier block is needed: the cut this block starts at misses a tensor
                return [], start - 1
            return [], end
        if last:
            new_nodes |= unassigned          # nodes no target needs (dead code) run with the last block
        unassigned -= new_nodes
        assigned |= new_nodes
        blocks.append(Block(old_nodes, sorted(new_nodes), cut_in, cut_out, outputs, _weight_bytes(g_old, old_nodes)))
        start, cut_in = end + 1, cut_out
    return blocks, None


def _upstream(graph: IndexedGraph, targets: list[str], stop: set[str], allowed: set[int]
              ) -> tuple[set[int] | None, int | None]:
    """(the nodes among `allowed` that compute `targets` from `stop`, None),
    or (None, a node they need that is not allowed)."""
    nodes, pending = set(), [t for t in targets if t not in stop]
    while pending:
        name = pending.pop()
        index = graph.producer.get(name)
        if index is None or index in nodes:
            continue
        if index not in allowed:
            return None, index
        nodes.add(index)
        pending.extend(n for n in node_inputs(graph.nodes[index]) if n not in stop and n not in graph.inits)
    return nodes, None


def _weight_bytes(graph: IndexedGraph, nodes: list[int]) -> int:
    names = {n for i in nodes for n in node_inputs(graph.nodes[i]) if n in graph.inits}
    return sum(io.tensor_nbytes(graph.inits[n]) for n in names)


def run_blocks(old: io.ModelHandle, new: io.ModelHandle, region: Region, blocks: list[Block], types_old: dict,
               types_new: dict, feeds: dict[str, np.ndarray], providers: list[str], *, rtol: float | None,
               atol: float | None, allow_nonfinite: bool, candidate_is_ours: bool, announce=None) -> BlockRun:
    """Run the blocks in order on both sides; compare R's outputs; infer E at the cuts."""
    values_old, values_new = dict(feeds), dict(feeds)
    result = BlockRun([], blocks)
    for number, block in enumerate(blocks, 1):
        if announce and len(blocks) > 1:
            announce(f"region block {number}/{len(blocks)}: {len(block.old_nodes)} node(s), "
                     f"{block.weight_bytes / 2**20:.1f} MiB of weights")
        wanted = list(dict.fromkeys(n for n in block.cut_out + block.outputs if n not in block.cut_in))
        reference, result.provider = _run_block(old, block.old_nodes, region, block, types_old, values_old,
                                                wanted, providers)
        with ours() if candidate_is_ours else contextlib.nullcontext():
            candidate, _ = _run_block(new, block.new_nodes, region, block, types_new, values_new, wanted, providers)
        for name in set(block.cut_in) - set(block.cut_out):
            del values_old[name], values_new[name]
        for name, a, b in zip(wanted, reference, candidate):
            if name in block.cut_out:
                values_old[name], values_new[name] = a, b
                result.expansions[name] = describe_expansion(a, b, rtol, atol)
            if name in block.outputs:
                result.outputs.append(compare_arrays(name, a, b, *tolerance_for(a.dtype, rtol, atol)[::-1],
                                                     allow_nonfinite))
    order = {name: k for k, name in enumerate(region.outputs)}
    result.outputs.sort(key=lambda o: order.get(o.name, len(order)))
    return result


def _run_block(handle: io.ModelHandle, nodes: list[int], region: Region, block: Block, types: dict,
               values: dict[str, np.ndarray], wanted: list[str], providers: list[str]
               ) -> tuple[list[np.ndarray], str]:
    arrays: dict = {}
    model = extract(handle, nodes, region.inputs + block.cut_in, wanted, types,
                    keep_external=handle.base_dir is not None, in_memory=arrays)
    inputs = {i.name for i in model.graph.input}
    try:
        session = make_session(model, providers, handle.base_dir, what="a region block", prepack=False,
                               arrays=arrays)
    except UserError as error:
        raise RegionUnavailable(f"an extracted region block does not load ({error})") from None
    del model
    produced = run_session(session, {k: v for k, v in values.items() if k in inputs}, wanted, what="a region block")
    return produced, session.get_providers()[0]


def describe_expansion(old: np.ndarray, new: np.ndarray, rtol: float | None = None, atol: float | None = None
                       ) -> str:
    """Which expansion map E gives `new` = E(`old`) along the one axis whose size differs."""
    if old.shape == new.shape:
        rtol, atol = tolerance_for(old.dtype, rtol, atol) if old.dtype.kind == "f" else (0.0, 0.0)
        same = np.allclose(new, old, rtol=rtol, atol=atol) if old.dtype.kind in "fiub" else False
        return "identity (same width)" if same else "same width, other values"
    axes = [a for a, (m, n) in enumerate(zip(old.shape, new.shape)) if m != n] if old.ndim == new.ndim else []
    if len(axes) != 1 or old.dtype.kind != "f":
        return f"not an expansion along one axis ({list(old.shape)} -> {list(new.shape)})"
    rtol, atol = tolerance_for(old.dtype, rtol, atol)
    a = np.moveaxis(old, axes[0], -1).reshape(-1, old.shape[axes[0]]).astype(np.float64)
    b = np.moveaxis(new, axes[0], -1).reshape(-1, new.shape[axes[0]]).astype(np.float64)
    kinds = _unit_sources(a, b, rtol, atol)
    if any(k is None for k in kinds):
        unit = kinds.index(None)
        return f"not a tiling or LEMON expansion (new unit {unit} matches no old unit, mean or zero)"
    copies = {k for k in kinds if isinstance(k, int)}
    extras = Counter(k for k in kinds if isinstance(k, str))
    text = f"tiling {a.shape[1]} -> {b.shape[1]}"
    if len(copies) < a.shape[1]:
        text += f" (only {len(copies)} old units kept)"
    return text + "".join(f" + {count} {kind} unit(s)" for kind, count in sorted(extras.items()))


def _unit_sources(old: np.ndarray, new: np.ndarray, rtol: float, atol: float) -> list[int | str | None]:
    """For each new unit (column): the old unit it copies, 'mean' or 'zero' (LEMON's extras), or None.

    Candidates are the old units nearest in a fixed random combination of
    the rows (a sorted search, not a q x n comparison; one row alone ties
    wherever many units share a value, as zeros after a Relu do); every row
    then confirms."""
    def close(reference):
        return np.all(np.abs(new - reference) <= atol + rtol * np.abs(reference), axis=0)

    mix = np.random.default_rng(0).standard_normal(len(old))
    key_old, key_new = mix @ old, mix @ new
    order = np.argsort(key_old, kind="stable")
    position = np.searchsorted(key_old[order], key_new)
    sources: list[int | str | None] = [None] * new.shape[1]
    for offset in (0, -1, 1, -2, 2):
        candidate = order[np.clip(position + offset, 0, len(order) - 1)]
        for unit in np.flatnonzero(close(old[:, candidate])):
            if sources[unit] is None:
                sources[unit] = int(candidate[unit])
    for name, reference in (("mean", old.mean(axis=1, keepdims=True)), ("zero", np.zeros((len(old), 1)))):
        for unit in np.flatnonzero(close(reference)):
            if sources[unit] is None:
                sources[unit] = name
    return sources


__all__ = ["BLOCK_WEIGHT_BYTES", "Block", "BlockRun", "plan_blocks", "run_blocks", "describe_expansion"]
