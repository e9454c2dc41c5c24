"""The index the analysis queries: an ONNX graph as a networkx DiGraph plus
tensor-level maps.

`GraphIR.dag` is a `networkx.DiGraph` whose nodes are indices into
`graph.node`; an edge `(producer, consumer)` carries the names of the tensors
flowing along it. It answers the node-level questions: topological order,
ancestors and descendants (the block search, reachability). Beside it, maps
answer the tensor-level ones: who produces and who consumes a tensor, which
tensors are constants (initializers, `Constant` nodes, and `Identity` chains
over them), what type and shape inference gives each tensor (None where
unknown).

The index is a snapshot, not a copy: it holds references into the
ModelProto and is never written by the analysis. Rewrites change the model
only through an `editor.GraphEditor` made on the index; once the editor has
committed, the index no longer describes the model, and the next request
builds a fresh one (`GraphIR(handle)`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from . import skeleton
from .errors import InternalError, ModelLoadError, first_line
from .io import ModelHandle


class Use(NamedTuple):
    """One input slot of a node reading a tensor (`port` -1: a subgraph reads it)."""

    node: int
    port: int


class GraphIR:
    """Producers, consumers, constants and shapes of a model's main graph."""

    def __init__(self, handle: ModelHandle, *, infer_shapes: bool = True):
        self.handle = handle
        self.graph = handle.proto.graph
        self.nodes = list(self.graph.node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = [v.name for v in self.graph.input if v.name not in self.initializers]
        self.graph_outputs = [v.name for v in self.graph.output]
        self.producer: dict[str, tuple[int, int]] = {}
        self.consumers: dict[str, list[Use]] = {}
        self.outer_reads: dict[int, set[str]] = {}  # node -> what its subgraphs read outside (nodes with any)
        self._index_nodes()
        self._dag = None
        self._order = self._topological_sort()
        self._shapes: dict[str, tuple | None] = {}
        self._dtypes: dict[str, int] = {}
        #: Shapes the analysis computed where inference gave up (analysis/refined_shapes.py), per index.
        self.refined_shapes: dict[str, tuple | None] = {}
        self._symbolic_pending: onnx.ModelProto | None = None
        self._inference_pending: onnx.ModelProto | None = None
        if infer_shapes and handle.rewritten and handle.checked:
            # A model this tool rewrote (checked when given): shapes are inferred on
            # the first question about them (many indexes of a pass never ask), from
            # the model as it is now (a copy: later edits do not reach it).
            self._inference_pending = skeleton.light_model(handle)
        elif infer_shapes:
            self._infer_shapes(skeleton.light_model(handle))

    # -- structure ----------------------------------------------------------

    def _index_nodes(self) -> None:
        defined = set(self.initializers) | {v.name for v in self.graph.input}
        for index, node in enumerate(self.nodes):
            for port, name in enumerate(node.output):
                if not name:
                    continue
                if name in self.producer or name in defined:
                    raise ModelLoadError(f"tensor '{name}' is defined twice (node {self.label(index)})")
                self.producer[name] = (index, port)
        known = defined | set(self.producer)
        for index, node in enumerate(self.nodes):
            for port, name in enumerate(node.input):
                if not name:
                    continue
                if name not in known:
                    raise ModelLoadError(
                        f"node {self.label(index)} reads '{name}', which nothing produces (dangling input)")
                self.consumers.setdefault(name, []).append(Use(index, port))
            outer = outer_scope_reads(node)
            if outer:
                self.outer_reads[index] = outer
            for name in outer:
                if name in known:
                    self.consumers.setdefault(name, []).append(Use(index, -1))
        for name in self.graph_outputs:
            if name not in known:
                raise ModelLoadError(f"graph output '{name}' is not produced by any node")

    @property
    def dag(self):
        """The node graph: networkx DiGraph over node indices, each edge
        (producer, consumer) carrying the tensors that flow along it. Built
        on first use (most indexes never need it: an index is built after
        every rewrite, and a sorted graph is ordered without it)."""
        if self._dag is None:
            self._dag = self._build_dag()
        return self._dag

    def _build_dag(self):
        import networkx as nx

        edges: dict[tuple[int, int], list[str]] = {}
        for tensor, uses in self.consumers.items():
            entry = self.producer.get(tensor)
            if entry is None:
                continue
            for use in uses:
                edges.setdefault((entry[0], use.node), []).append(tensor)
        dag = nx.DiGraph()
        dag.add_nodes_from(range(len(self.nodes)))
        dag.add_edges_from((producer, consumer, {"tensors": tensors}) for (producer, consumer), tensors in edges.items())
        return dag

    def _is_sorted(self) -> bool:
        """Every tensor is produced by a node before each node reading it."""
        for tensor, uses in self.consumers.items():
            entry = self.producer.get(tensor)
            if entry is not None and any(entry[0] >= use.node for use in uses):
                return False
        return True

    def _topological_sort(self) -> list[int]:
        """Topological order, smallest node index first among the ready ones
        (so an already sorted graph keeps its order); ModelLoadError on a cycle."""
        import networkx as nx

        if self._is_sorted():
            return list(range(len(self.nodes)))  # already sorted (the usual case): the same order, found in O(E)
        try:
            return list(nx.lexicographical_topological_sort(self.dag))
        except nx.NetworkXUnfeasible:
            source, target = nx.find_cycle(self.dag)[0][:2]
            raise ModelLoadError(f"graph has a cycle through node {self.label(target)}") from None

    def ancestors(self, node: int) -> set[int]:
        """The nodes `node` is computed from (not itself)."""
        import networkx as nx

        return nx.ancestors(self.dag, node)

    def descendants(self, node: int) -> set[int]:
        """The nodes computed from `node` (not itself)."""
        import networkx as nx

        return nx.descendants(self.dag, node)

    def topological_order(self) -> list[int]:
        return list(self._order)

    def label(self, index: int) -> str:
        """A readable name for node `index` (its name, or op and position)."""
        node = self.nodes[index]
        return f"'{node.name}'" if node.name else f"{node.op_type}#{index}"

    def taken_names(self) -> set[str]:
        """Every node, initializer, tensor and graph input name in use, names
        defined inside subgraphs (If/Loop/Scan bodies) included: a fresh name in
        the main graph must not be shadowed by, or shadow, one of theirs."""
        names = ({n.name for n in self.nodes} | set(self.initializers) | set(self.producer)
                 | {v.name for v in self.graph.input})
        for node in self.nodes:
            for subgraph in _subgraphs(node):
                names |= _names_defined_in(subgraph)
        return names

    def uses(self, tensor: str) -> list[Use]:
        return self.consumers.get(tensor, [])

    def producer_node(self, tensor: str) -> int | None:
        entry = self.producer.get(tensor)
        return entry[0] if entry else None

    # -- constants ----------------------------------------------------------

    def const_root(self, tensor: str) -> tuple[str, str | int] | None:
        """Where a constant tensor's data lives: ('init', name) or ('node', index).

        Follows Identity nodes (exporters put them on shared weights).
        """
        seen = 0
        while seen < 64:
            if tensor in self.initializers:
                return ("init", tensor)
            entry = self.producer.get(tensor)
            if entry is None:
                return None
            node = self.nodes[entry[0]]
            if node.op_type == "Constant":
                return ("node", entry[0])
            if node.op_type != "Identity":
                return None
            tensor = node.input[0]
            seen += 1
        return None

    @property
    def opset(self) -> int:
        """The model's default-domain opset (1 when it imports none)."""
        return next((o.version for o in self.handle.proto.opset_import if o.domain in ("", "ai.onnx")), 1)

    def const_value(self, tensor: str) -> np.ndarray | None:
        root = self.const_root(tensor)
        if root is None:
            return None
        kind, key = root
        if kind == "init":
            return self.handle.array(self.initializers[key])
        return constant_node_value(self.nodes[key])

    def is_const(self, tensor: str) -> bool:
        return self.const_root(tensor) is not None

    # -- shapes -------------------------------------------------------------

    def shape(self, tensor: str) -> tuple | None:
        """Shape as a tuple of ints (None for an unknown dim), or None if unknown."""
        if tensor in self.initializers:
            return tuple(int(d) for d in self.initializers[tensor].dims)
        shape = self.shapes.get(tensor)
        if (shape is None or None in shape[1:]) and self._symbolic_pending is not None:
            # Only when an unknown shape is asked for: onnxruntime's symbolic
            # inference costs seconds (onnxruntime.tools imports torch, sympy).
            light, self._symbolic_pending = self._symbolic_pending, None
            self._refine_with_symbolic_inference(light)
            shape = self.shapes.get(tensor)
        return shape

    def inferred_shape(self, tensor: str) -> tuple | None:
        """`shape` as ONNX inference found it, without waiting for symbolic
        inference (a dim it left unknown is None)."""
        if tensor in self.initializers:
            return tuple(int(d) for d in self.initializers[tensor].dims)
        return self.shapes.get(tensor)

    def rank(self, tensor: str) -> int | None:
        """The number of axes, or None if unknown. A shape ONNX inference
        found keeps its rank when symbolic inference refines its dims, so
        only an entirely unknown shape waits for that refinement."""
        known = self.shapes.get(tensor)
        if known is not None and tensor not in self.initializers:
            return len(known)
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dim(self, tensor: str, axis: int) -> int | None:
        """`shape(tensor)[axis]` (None: unknown). Symbolic refinement only
        fills dims ONNX inference left unknown, so a dim it found answers
        without waiting for that refinement."""
        known = self.shapes.get(tensor)
        if known is not None and tensor not in self.initializers and known[axis] is not None:
            return known[axis]
        shape = self.shape(tensor)
        return None if shape is None else shape[axis]

    @property
    def shapes(self) -> dict[str, tuple | None]:
        """Every tensor's shape as inferred so far (see `shape`)."""
        self._infer_pending_shapes()
        return self._shapes

    @property
    def dtypes(self) -> dict[str, int]:
        """Every tensor's element type as inferred."""
        self._infer_pending_shapes()
        return self._dtypes

    def _infer_pending_shapes(self) -> None:
        if self._inference_pending is not None:
            light, self._inference_pending = self._inference_pending, None
            self._infer_shapes(light)

    def _infer_shapes(self, light: onnx.ModelProto) -> None:
        if not self.handle.checked:
            _check_once(self.handle, light)
        try:
            inferred = skeleton.infer(light)
        except Exception as exc:  # noqa: BLE001 - onnx raises InferenceError and bare RuntimeErrors
            message = first_line(exc)
            if self.handle.rewritten:
                raise InternalError(f"a rewrite left the model's shapes inconsistent: {message}") from None
            raise ModelLoadError(f"shapes are inconsistent: {message}") from None
        self._read_shapes(inferred.graph)
        if self._has_unknown_shapes():
            self._symbolic_pending = light  # refined on the first question about an unknown shape

    def _read_shapes(self, graph: onnx.GraphProto, only_unknown: bool = False) -> None:
        for value in list(graph.value_info) + list(graph.input) + list(graph.output):
            type_proto = value.type
            if not type_proto.HasField("tensor_type"):
                continue
            tensor_type = type_proto.tensor_type
            self._dtypes.setdefault(value.name, tensor_type.elem_type)
            if not tensor_type.HasField("shape"):
                continue
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
            known = self._shapes.get(value.name)
            if only_unknown and known is not None:
                if len(known) != len(shape):
                    continue
                shape = tuple(k if k is not None else s for k, s in zip(known, shape))
            self._shapes[value.name] = shape

    def _has_unknown_shapes(self) -> bool:
        for node in self.nodes:
            for name in node.output:
                if name and (self._shapes.get(name) is None or None in self._shapes[name][1:]):
                    return True
        return False

    def _refine_with_symbolic_inference(self, light: onnx.ModelProto) -> None:
        """onnxruntime's symbolic shape inference follows shapes computed at run
        time (Shape -> Gather -> Concat -> Reshape) where ONNX's gives up."""
        try:
            SymbolicShapeInference = _symbolic_shape_inference()
            # The loop of SymbolicShapeInference.infer_shapes, which would also
            # write a file into the working folder when inference is incomplete.
            inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
            with _quiet_symbolic_inference():
                inference._preprocess(light)
                while inference.run_:
                    inference._infer_impl()
                inference._update_output_from_vi()
            inferred = inference.out_mp_
        except Exception:  # noqa: BLE001 - best effort: unknown shapes stay unknown
            return
        self._read_shapes(inferred.graph, only_unknown=True)


@contextlib.contextmanager
def _quiet_symbolic_inference():
    """Silence the symbolic inference's warnings ("Unable to determine if
    floor(Pad_d1/2) <= Pad_d1, treat as equal": its own guesses, printed by
    the hundred on models with padding computed at run time); its errors
    still show, and its exceptions are handled by the caller."""
    logger = logging.getLogger(_SYMBOLIC_MODULE)
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


#: The name the symbolic inference module is loaded under (its logger's name too).
_SYMBOLIC_MODULE = "onnx_net2net._ort_symbolic_shape_infer"


def _symbolic_shape_inference():
    """onnxruntime's SymbolicShapeInference class, loaded from its file:
    `import onnxruntime.tools.symbolic_shape_infer` runs onnxruntime/tools/__init__,
    which imports torch when installed (seconds and ~900 MB for nothing)."""
    import importlib.util
    import sys

    name = _SYMBOLIC_MODULE
    module = sys.modules.get(name)
    if module is None:
        package = importlib.util.find_spec("onnxruntime")
        path = Path(package.submodule_search_locations[0]) / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module.SymbolicShapeInference


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.array(attr.f if attr.name == "value_float" else attr.i)
        if attr.name in ("value_floats", "value_ints"):
            return np.array(list(attr.floats) if attr.name == "value_floats" else list(attr.ints))
    return None


def node_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _check_once(handle: ModelHandle, light: onnx.ModelProto) -> None:
    """`onnx.checker` on the model as given (weights left out), once per handle."""
    try:
        onnx.checker.check_model(light)
    except onnx.checker.ValidationError as exc:
        if handle.rewritten:
            raise InternalError(f"a rewrite produced an invalid model: {first_line(exc)}") from None
        raise ModelLoadError(f"invalid model: {first_line(exc)[:300]}") from None
    handle.checked = True


def outer_scope_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for graph in _subgraphs(node):
        local = {t.name for t in graph.initializer} | {v.name for v in graph.input}
        for inner in graph.node:
            local.update(inner.output)
        for inner in graph.node:
            names.update(n for n in inner.input if n and n not in local)
            names.update(outer_scope_reads(inner) - local)
        names.update(v.name for v in graph.output if v.name not in local)  # a branch returning an outer tensor
    return names


#: The standard ops whose schemas take graph attributes (the checker rejects
#: a graph attribute on any other standard op).
_OPS_WITH_SUBGRAPHS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    # Asked of every node at every index build: reading attributes is the cost.
    if node.domain in ("", "ai.onnx") and node.op_type not in _OPS_WITH_SUBGRAPHS:
        return []
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def _names_defined_in(graph: onnx.GraphProto) -> set[str]:
    """Node, tensor, initializer and input names a subgraph (and its own subgraphs) defines."""
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.add(node.name)
        names.update(o for o in node.output if o)
        for subgraph in _subgraphs(node):
            names |= _names_defined_in(subgraph)
    names.discard("")
    return names
