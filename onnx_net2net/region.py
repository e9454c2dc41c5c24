"""Region verification: check only the part of the graph a rewrite changed.

The argument
------------
Diff the reference graph G_old and the candidate G_new: a node is *unchanged*
when the other graph has a node with the same op, domain, attributes, inputs
and outputs, and every initializer it reads has the same type, shape and bytes
in both models. Every other node seeds the region. The region R is closed
over the tensors between its seeds: a node that is both downstream and
upstream of region nodes joins R (in either graph, and a node joining R in
one graph joins it in the other), until nothing changes. Then

* outside R, G_old and G_new are the same nodes reading the same weights, so
  every tensor produced outside R is the same function of the graph inputs
  and of R's outputs in both models;
* R's *boundary inputs* (tensors R reads but does not produce, weights aside)
  are produced outside R, upstream of it, so they carry the same values x in
  both models;
* R's *boundary outputs* (tensors R produces that are read outside R, or are
  graph outputs) are all the rest of the graph sees of R.

So if R_old(x) = R_new(x) for every x the boundary can carry, the models
compute the same function. Memory and time then scale with R (its weights,
read from disk alone; untouched external weights are never read), not with
the model.

Conditions and limits (stated, not hidden):

* Random x at the boundary (seeded, standard normal for floats) is a test,
  not a proof, exactly like full verification's random graph inputs. It is
  the right test for rewrites that are exact for *all* inputs (Net2Net).
* Random boundary values may be states the real model never produces (for
  example x and relu(x) both entering R, drawn independently). A region check
  is therefore at least as strict as needed, never laxer, for an exact
  rewrite: an R that agrees for all x makes the models agree.
* Boundary tensors whose values matter structurally (integer indices, shape
  tensors, booleans) and float tensors whose concrete shape is not known
  statically are computed from the real reference model on the verification
  inputs: the nodes upstream of them are extracted and run (their weights
  read) if those weights are small (`CONE_WEIGHT_LIMIT`); otherwise region
  mode falls back to full verification and says why.
* A widened group's region ends where the consumers contract the widened axis,
  so its boundary outputs keep their original shapes. If a boundary output's
  shape differs between the two regions, or the graph inputs/outputs differ,
  region mode falls back to full verification (with a note).
* A group spanning the whole network (a transformer's residual stream) makes R
  the whole model. Its time is then what full verification costs, but not its
  memory: a region holding more than `region_blocks.BLOCK_WEIGHT_BYTES` of
  weights runs block by block (cut between the stream's blocks, one session
  per block, freed before the next), and at each cut the candidate's stream
  is checked to be E(reference's), E the expansion map: tiling (new unit j
  copies old unit m[j]) or LEMON (copies, plus extra units carrying the mean
  over the old units, or zero for RMSNorm). See `region_blocks`. `auto` still
  picks full for such rewrites when the model fits in memory (region weights
  above `AUTO_REGION_SHARE` of the model): full is then as cheap.
* Nodes with subgraphs (If, Loop, Scan) in the region: region mode falls back
  to full verification.
* In `widen`/`deepen`/`grow`, region mode checks the rewritten model in memory
  (its untouched external weights are references into the input's data file,
  and its untouched large inline weights, loaded lazily, references into the
  input model file: equal by location without being read); the streamed copy
  of untouched weights into the output is checked by length, not by value.

Where the code is: `region_diff` (the graph index, the diff and its closure:
`find_region`), `region_extract` (a standalone model of some nodes, reading
only their weights), `region_run` (boundary types and values, running both
regions and comparing: `verify_region`), `region_blocks` (a large region in
pieces), this module (choosing a mode and the entry points).

Choosing (`--verify auto`): region when the model's weights exceed
`AUTO_REGION_BYTES` (1 GiB) or a third of the memory available now, unless
the region holds more than `AUTO_REGION_SHARE` of the weights; full otherwise.
"""

from __future__ import annotations

import os

from . import io
from .options import VerifyMode, parse
from .region_diff import Region, RegionUnavailable, find_region
from .region_extract import extract
from .region_run import boundary_values, verify_region
from .verification import ReferenceRun, VerificationReport

#: `auto` chooses region verification above this many bytes of weights.
AUTO_REGION_BYTES = 1 << 30
#: ... or above this share of the memory available now.
AUTO_MEMORY_SHARE = 1 / 3
#: ... unless the region holds more than this share of the weights (full is then as cheap).
AUTO_REGION_SHARE = 0.5
MODES = tuple(str(mode) for mode in VerifyMode)


def choose_mode(mode: str, weight_bytes: int) -> str:
    """`auto` -> region for models over AUTO_REGION_BYTES or a third of available memory."""
    if mode != "auto":
        return mode
    memory = io.available_memory()
    large = weight_bytes > AUTO_REGION_BYTES or (memory is not None and weight_bytes > memory * AUTO_MEMORY_SHARE)
    return "region" if large else "full"


def verify_pair(old: io.ModelHandle, new: io.ModelHandle, full, *, mode: str = "auto", announce=None,
                **options) -> VerificationReport:
    """Verify by `mode` ('auto', 'full', 'region'); `full()` runs full
    verification (the caller knows the paths). Region falls back to it, with a note."""
    mode = parse(VerifyMode, "verify_mode", mode)
    weight_bytes = max(old.weight_bytes(), new.weight_bytes())
    if choose_mode(mode, weight_bytes) == "full":
        return full()
    try:
        region = find_region(old, new)
        if mode == "auto" and region.old_weight_bytes > AUTO_REGION_SHARE * weight_bytes and _fits(weight_bytes):
            raise RegionUnavailable(f"the region holds {region.old_weight_bytes / max(1, weight_bytes):.0%} of the "
                                    f"weights, full verification costs about as much")
        return verify_region(old, new, announce=announce, region=region, **options)
    except RegionUnavailable as why:
        note = f"region verification not used ({why}); running full verification"
        if announce:
            announce(note)
        report = full()
        report.notes.append(note)
        return report


def _fits(weight_bytes: int) -> bool:
    memory = io.available_memory()
    return memory is None or 3 * weight_bytes < memory


def verify_files(reference: str | os.PathLike, candidate: str | os.PathLike, *, mode: str = "auto",
                 announce=None, **options) -> VerificationReport:
    """`verify REFERENCE CANDIDATE --verify MODE`: any pair of model files.
    Both load lazily: in region mode a weight outside the region is compared
    by its bytes in chunks (or by its location) and never held whole."""
    from . import verification

    old, new = io.load(reference, lazy=True), io.load(candidate, lazy=True)

    def full() -> VerificationReport:
        return verification.verify_models(str(reference), str(candidate), announce=announce, **options)

    return verify_pair(old, new, full, mode=mode, announce=announce, **options)


def verify_grown(source: str | os.PathLike, grown: io.ModelHandle, staged: str | os.PathLike, *,
                 mode: str = "auto", announce=None, **options) -> VerificationReport:
    """Verify a rewritten model (`grown`, in memory, its untouched external
    weights still references into the source's data) against its source;
    full verification runs the written file `staged`. The source is loaded
    as `grown` was (lazily when its inline weights were deferred), so the
    untouched weights of both refer to the same bytes and are never read."""
    from .verification import ours

    def full() -> VerificationReport:
        reference = ReferenceRun(str(source), announce=announce, **options)
        with ours():
            return reference.compare(str(staged))

    if choose_mode(mode, grown.weight_bytes()) == "full":
        return full()
    reference = io.load(source, lazy=bool(grown.deferred))
    return verify_pair(reference, grown, full, mode=mode, announce=announce, candidate_is_ours=True, **options)


def verify_models(reference, candidate, *, mode: str = "full", **options) -> VerificationReport:
    """The API's `verify` with a mode: ModelProtos or paths."""
    from .verification import verify_models as verify_full

    if mode == "full":
        return verify_full(reference, candidate, **options)
    old, new = (io.load(m) if isinstance(m, (str, os.PathLike)) else io.from_proto(m) for m in (reference, candidate))
    return verify_pair(old, new, lambda: verify_full(reference, candidate, **options), mode=mode, **options)


__all__ = ["MODES", "Region", "RegionUnavailable", "find_region", "extract", "boundary_values", "verify_region",
           "verify_pair", "verify_files", "verify_grown", "verify_models", "choose_mode"]
