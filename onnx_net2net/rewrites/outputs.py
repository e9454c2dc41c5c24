"""Keep the shapes of graph outputs that carry a widened space.

With `keep_output_shapes`, a graph output t may carry the units (an encoder's
last hidden state). The widened tensor is renamed t' and the output becomes

    t = Gather(t', keep, axis)        (Slice when `keep` is one range)

where `keep` lists the positions of t' on the unit axis that hold an original
unit (or data outside the space). This is exact when the original units keep
their values: every producer copies unit u to position u (Net2Net, tiling),
and a normalisation over the units gives the same values when every unit is
copied equally often (tiling) or when LEMON's average expansion rescales it;
verification compares the sliced outputs with the original ones.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..editor import GraphEditor


def slice_kept_outputs(edit: GraphEditor, kept: dict, keep_positions) -> list[str]:
    """Rename each kept output's tensor and append the node that restores it.

    `keep_positions(placement)` gives the positions of original data on the
    widened unit axis.
    """
    written = []
    for output, placement in kept.items():
        wide = edit.fresh_name(f"{output}/widened")
        edit.rename_tensor(output, wide)
        keep = np.asarray(keep_positions(placement), dtype=np.int64)
        edit.append([_restore(edit, wide, output, keep, placement.axis)])
        written.append(output)
    return written


def _restore(edit: GraphEditor, wide: str, output: str, keep: np.ndarray, axis: int):
    prefix = edit.fresh_prefix(f"{output}/kept")
    if np.array_equal(keep, np.arange(keep[0], keep[0] + len(keep))):
        bounds = {f"{prefix}_{what}": np.array([value], np.int64)
                  for what, value in (("starts", keep[0]), ("ends", keep[0] + len(keep)), ("axes", axis))}
        inputs = [wide] + list(bounds)
        node = helper.make_node("Slice", inputs, [output], name=prefix)
    else:
        bounds = {f"{prefix}_indices": keep}
        node = helper.make_node("Gather", [wide, f"{prefix}_indices"], [output], name=prefix, axis=axis)
    for name, value in bounds.items():
        edit.add_initializer(value, name)
    return node
