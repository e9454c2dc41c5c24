"""Running a region: boundary types, extraction, boundary values, comparison.

The region found by `region_diff.find_region` is extracted from each model
(its weights only: external ones stay references into the model's data file,
large inline ones reach onnxruntime as arrays), fed the same values at its
boundary inputs (random for float tensors of known shape; computed from the
reference model for structural ones), and its boundary outputs are compared
(`verify_region`).
"""

from __future__ import annotations

import contextlib
from collections import deque

import numpy as np
import onnx
from onnx import TensorProto

from . import io, region_blocks
from .errors import UserError
from .region_blocks import plan_blocks, run_blocks
from .region_diff import (IndexedGraph, Region, RegionUnavailable, concrete_dims, elem_type, find_region, has_subgraph,
                          node_inputs, region_weight_bytes, shape_constant)
from .region_extract import extract
from .sessions import make_session, run_session
from .skeleton import light_model
from .verification import (InputSpec, VerificationReport, choose_providers, compare_arrays, make_inputs, ours,
                           tolerance_for)

#: Weights upstream of structural boundary tensors that may be read to compute them.
CONE_WEIGHT_LIMIT = 64 << 20
#: Integer initializers this small keep their values in the shape-inference skeleton (shape constants).
SMALL_TENSOR_BYTES = 4096
#: Float types random boundary values are drawn in (numpy has no bfloat16: those are computed instead).
_RANDOM_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}


def _shape_skeleton(handle: io.ModelHandle, spec: InputSpec) -> onnx.ModelProto:
    """The model without its large weights (`skeleton.light_model`), graph
    inputs pinned to the shapes verification feeds, ready for shape inference."""
    model = light_model(handle)
    for value in model.graph.input[:len(handle.graph.input)]:
        value.CopyFrom(_pinned(value, spec))
    return model


def _pinned(value: onnx.ValueInfoProto, spec: InputSpec) -> onnx.ValueInfoProto:
    """The graph input with the concrete shape verification gives it."""
    pinned = onnx.ValueInfoProto()
    pinned.CopyFrom(value)
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return pinned
    dims = pinned.type.tensor_type.shape.dim
    wanted = spec.shapes.get(value.name)
    if wanted is not None and len(wanted) == len(dims):
        for dim, size in zip(dims, wanted):
            dim.Clear()
            dim.dim_value = size
        return pinned
    for axis, dim in enumerate(dims):
        if not (dim.HasField("dim_value") and dim.dim_value > 0):
            dim.Clear()
            dim.dim_value = 2 if axis == 0 else 1  # verification.make_inputs' choice (DEFAULT_BATCH, 1)
    return pinned


def _value_types(handle: io.ModelHandle, spec: InputSpec) -> dict[str, onnx.TypeProto]:
    """Every tensor's type as shape inference (with data propagation) sees it."""
    skeleton = _shape_skeleton(handle, spec)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown shapes are handled
        inferred = skeleton
    graph = inferred.graph
    types = {v.name: v.type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    for tensor in handle.graph.initializer:
        types[tensor.name] = onnx.helper.make_tensor_type_proto(tensor.data_type, tensor.dims)
    return types


class _Spec:
    """What `verification.make_inputs` needs of a session: typed, shaped inputs."""

    class _Arg:
        def __init__(self, name, ort_type, shape):
            self.name, self.type, self.shape = name, ort_type, shape

    def __init__(self, args):
        self._args = args

    def get_inputs(self):
        return self._args


_ORT_TYPE = {TensorProto.FLOAT: "tensor(float)", TensorProto.DOUBLE: "tensor(double)",
             TensorProto.FLOAT16: "tensor(float16)"}


def boundary_values(old: io.ModelHandle, region: Region, types: dict, spec: InputSpec, announce=None
                    ) -> dict[str, np.ndarray]:
    """The values fed at the region's boundary:

    * graph inputs: exactly what full verification feeds;
    * static tensors (constants, shapes of tensors whose shape is known, and
      what is computed from them only): their exact values;
    * other float tensors of known shape: seeded random values;
    * the rest (indices, masks, unknown shapes): their real values, computed by
      the reference's nodes upstream of them on the verification inputs."""
    graph = IndexedGraph.of(old)
    graph_inputs = _graph_input_values(old, spec, announce)
    dynamic = _dynamic_tensors(graph, types)
    values, random_args, static, structural = {}, [], [], []
    for name in region.inputs:
        dims, elem = concrete_dims(types.get(name)), elem_type(types.get(name))
        if name in graph_inputs:
            values[name] = graph_inputs[name]
        elif name not in dynamic:
            static.append(name)
        elif elem in _RANDOM_FLOAT_TYPES and dims is not None:
            random_args.append(_Spec._Arg(name, _ORT_TYPE[elem], dims))
        else:
            structural.append(name)
    if random_args:
        values.update(make_inputs(_Spec(random_args), InputSpec(seed=spec.seed)))
    if static:
        values.update(_computed_values(old, graph, static, types, {}, weight_limit=None))
    if structural:
        values.update(_computed_values(old, graph, structural, types, graph_inputs, weight_limit=CONE_WEIGHT_LIMIT))
    return values


def _dynamic_tensors(graph: IndexedGraph, types: dict) -> set[str]:
    """Tensors whose values depend on the graph inputs' values (graph nodes are
    in topological order; with the inputs' shapes pinned, Shape and Size of a
    tensor of known shape are static)."""
    dynamic = {v.name for v in graph.handle.graph.input if v.name not in graph.inits}
    for node in graph.nodes:
        if shape_constant(node, types) is not None:
            continue
        if any(n in dynamic for n in node_inputs(node)):
            dynamic.update(o for o in node.output if o)
    return dynamic


def _cone(graph: IndexedGraph, names: list[str], types: dict) -> tuple[set[int], dict[int, onnx.NodeProto]]:
    """The nodes upstream of `names`, stopping at Shape/Size nodes of known
    value, which become Constant nodes."""
    start = {graph.producer[n] for n in names if n in graph.producer}
    seen, queue, frozen = set(start), deque(start), {}
    while queue:
        index = queue.popleft()
        node = graph.nodes[index]
        value = shape_constant(node, types)
        if value is not None:
            frozen[index] = onnx.helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                                  value=onnx.numpy_helper.from_array(value))
            continue
        for name in node_inputs(node):
            producer = graph.producer.get(name)
            if producer is not None and producer not in seen:
                seen.add(producer)
                queue.append(producer)
    return seen, frozen


def _computed_values(handle: io.ModelHandle, graph: IndexedGraph, names: list[str], types: dict,
                     feeds: dict[str, np.ndarray], weight_limit: int | None) -> dict[str, np.ndarray]:
    """Run the reference's nodes upstream of `names` (on `feeds`, the graph inputs)."""
    cone, frozen = _cone(graph, names, types)
    live = cone - set(frozen)
    weight_bytes = region_weight_bytes(graph, live)
    if weight_limit is not None and weight_bytes > weight_limit:
        raise RegionUnavailable(f"computing the boundary's index/shape tensors {names[:2]} would read "
                                f"{weight_bytes >> 20} MiB of weights upstream of the region")
    graph_inputs = [v.name for v in handle.graph.input if v.name not in graph.inits]
    model = extract(handle, sorted(cone), graph_inputs, names, types, replaced=frozen)
    session = make_session(model, ["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    produced = run_session(session, {k: v for k, v in feeds.items() if k in wanted}, names, what="the region")
    return dict(zip(names, produced))


def _graph_input_values(handle: io.ModelHandle, spec: InputSpec, announce) -> dict[str, np.ndarray]:
    """The graph inputs exactly as full verification makes them (same seed, same order)."""
    inits = {t.name for t in handle.graph.initializer}
    args = []
    for value in handle.graph.input:
        if value.name in inits:
            continue
        tensor_type = value.type.tensor_type
        ort_type = f"tensor({_ORT_NAME.get(tensor_type.elem_type, 'unknown')})"
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        args.append(_Spec._Arg(value.name, ort_type, shape))
    return make_inputs(_Spec(args), spec, announce)


_ORT_NAME = {TensorProto.FLOAT: "float", TensorProto.DOUBLE: "double", TensorProto.FLOAT16: "float16",
             TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.INT16: "int16",
             TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.UINT16: "uint16",
             TensorProto.UINT32: "uint32", TensorProto.UINT64: "uint64", TensorProto.BOOL: "bool"}


def verify_region(old: io.ModelHandle, new: io.ModelHandle, *, inputs: InputSpec | None = None,
                  atol: float | None = None, rtol: float | None = None, providers: list[str] | None = None,
                  announce=None, region: Region | None = None, base_dir=None, allow_nonfinite: bool = False,
                  upcast: bool = True, candidate_is_ours: bool = False,
                  block_bytes: int | None = None) -> VerificationReport:
    """Compare the changed region of two models on the same boundary values.

    Tolerances default by each boundary output's type, as in full
    verification; non-finite reference values fail unless allowed.

    Raises RegionUnavailable when the pair cannot be decided by its region
    (the caller then runs full verification). A region holding more than
    `block_bytes` of weights (default `region_blocks.BLOCK_WEIGHT_BYTES`) runs
    block by block (`region_blocks`). `base_dir` and `upcast` are
    accepted for symmetry with ReferenceRun and unused: handles know their
    folders, and a region's low-precision outputs are reported natively."""
    spec = inputs or InputSpec()
    atol_fp32, rtol_fp32 = tolerance_for("tensor(float)", rtol, atol)[::-1]
    region = region or find_region(old, new)
    if region.old_nodes or region.new_nodes:
        types_old, types_new = _value_types(old, spec), _value_types(new, spec)
        region = find_region(old, new, types_old=types_old, types_new=types_new,
                             changed=set(region.changed_weights))
    if not region.old_nodes and not region.new_nodes:
        return VerificationReport(True, "none (the graphs are identical)", atol_fp32, rtol_fp32, [],
                                  notes=["region: no node or weight differs; the models are the same graph"])
    if any(has_subgraph(old.graph.node[i]) for i in region.old_nodes) or \
            any(has_subgraph(new.graph.node[i]) for i in region.new_nodes):
        raise RegionUnavailable("the region contains a node with a subgraph (If/Loop/Scan)")
    types_new.update({name: types_old[name] for name in region.inputs if name in types_old})
    feeds = boundary_values(old, region, types_old, spec, announce)
    providers = choose_providers(providers)
    blocks = _blocks(old, new, region, block_bytes)
    if len(blocks) > 1:
        run = run_blocks(old, new, region, blocks, types_old, types_new, feeds, providers, rtol=rtol, atol=atol,
                         allow_nonfinite=allow_nonfinite, candidate_is_ours=candidate_is_ours, announce=announce)
        return VerificationReport(all(o.passed for o in run.outputs), run.provider, atol_fp32, rtol_fp32,
                                  run.outputs, [_describe(region)] + run.notes())
    reference, provider = _run_region(old, region.old_nodes, region, types_old, feeds, providers)
    with ours() if candidate_is_ours else contextlib.nullcontext():
        candidate, _ = _run_region(new, region.new_nodes, region, types_new, feeds, providers)
    for name, a, b in zip(region.outputs, reference, candidate):
        if a.shape != b.shape:
            raise RegionUnavailable(f"boundary output '{name}' has shape {list(b.shape)} instead of "
                                    f"{list(a.shape)}")
    outputs = [compare_arrays(name, a, b, *tolerance_for(a.dtype, rtol, atol)[::-1], allow_nonfinite)
               for name, a, b in zip(region.outputs, reference, candidate)]
    return VerificationReport(all(o.passed for o in outputs), provider, atol_fp32, rtol_fp32, outputs,
                              [_describe(region)])


def _blocks(old: io.ModelHandle, new: io.ModelHandle, region: Region, block_bytes: int | None) -> list:
    """The region's blocks when it holds more than `block_bytes` of weights, else one."""
    limit = region_blocks.BLOCK_WEIGHT_BYTES if block_bytes is None else block_bytes
    if max(region.old_weight_bytes, region.new_weight_bytes) <= limit:
        return [None]
    return plan_blocks(old, new, region, limit)


def _run_region(handle, nodes, region: Region, types, feeds, providers) -> tuple[list[np.ndarray], str]:
    """Extract one side's region, run it on the boundary values, free it."""
    arrays = {}
    model = extract(handle, nodes, region.inputs, region.outputs, types, keep_external=handle.base_dir is not None,
                    in_memory=arrays)
    wanted = {i.name for i in model.graph.input}
    try:
        # No weight prepacking: a region runs once, and re-laying out its weights costs more than the run.
        session = make_session(model, providers, handle.base_dir, what="the region", prepack=False, arrays=arrays)
    except UserError as error:
        raise RegionUnavailable(f"the extracted region does not load ({error})") from None
    del model
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    return run_session(session, feeds, region.outputs, what="the region"), session.get_providers()[0]


def _describe(region: Region) -> str:
    return (f"region verification: {len(region.old_nodes)} -> {len(region.new_nodes)} node(s), "
            f"{len(region.inputs)} boundary input(s), {len(region.outputs)} boundary output(s), "
            f"weights {region.old_weight_bytes / 2**20:.1f} -> {region.new_weight_bytes / 2**20:.1f} MiB; "
            f"random boundary values are a test, not a proof")
