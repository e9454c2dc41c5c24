"""The one place that changes a model's graph.

Rewrites read the graph through the index (`ir.GraphIR`) and change it only
through a `GraphEditor` on that index:

- names: `fresh_name`/`fresh_prefix` give names no node, tensor or
  initializer uses, counting the ones this editor handed out already;
- constants: `add_initializer` adds one, `set_constant` replaces a constant's
  value in place (an initializer or a `Constant` node, keeping its dtype),
  `store_constants` writes edited values back, in place when every reader
  wants the same value and as fresh initializers for the readers that differ;
- wiring and attributes: `set_input`, `redirect_uses`, `rename_tensor`,
  `add_to_attribute`, `scale_attribute`;
- node order: `insert_before`, `insert_after_producer`, `append` queue new
  nodes beside the node positions of the index; `commit` (on leaving the
  `with` block) rebuilds the node list once, so the graph stays in
  topological order whatever the number of insertions;
- leftovers: a rewrite run inside `orphans_removed(handle)` leaves no node or
  initializer it stopped reading (an old reshape target replaced by a grown
  one, a constant no reader wants any more); what the input itself left
  unread stays, it is not ours to remove.

Node indices always refer to the index the editor was made on. After
`commit` the index no longer describes the model:
index-based edits raise, and the next request builds a fresh `GraphIR`.
Type declarations are not edited here: the pass runs each rewrite inside
`typeinfo.kept_consistent`, which redeclares what changed.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from .io import set_tensor_values
from .ir import GraphIR, outer_scope_reads


class GraphEditor:
    """Edits to the model indexed by `ir`, applied in topological order."""

    def __init__(self, ir: GraphIR):
        self.ir = ir
        self._taken_names: set[str] | None = None  # the index's names plus those handed out, built once
        self._before: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        self._appended: list[onnx.NodeProto] = []
        self._rebuilt = False  # the node list was rebuilt: the index's node positions no longer hold

    def __enter__(self) -> GraphEditor:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()

    # -- names ----------------------------------------------------------------

    def fresh_name(self, base: str) -> str:
        """`base`, or `base1`, `base2`, ...: the first name not in use."""
        taken, name, k = self._taken(), base, 1
        while name in taken:
            name, k = f"{base}{k}", k + 1
        self._reserve(name)
        return name

    def fresh_prefix(self, base: str) -> str:
        """`base0`, `base1`, ...: the first that starts no name in use."""
        taken, k = self._taken(), 0
        while any(name.startswith(f"{base}{k}") for name in taken):
            k += 1
        self._reserve(f"{base}{k}")
        return f"{base}{k}"

    def _taken(self) -> set[str]:
        if self._taken_names is None:
            self._taken_names = self.ir.taken_names()
        return self._taken_names

    def _reserve(self, name: str) -> None:
        self._taken().add(name)

    def _reserve_names_of(self, nodes: list[onnx.NodeProto]) -> None:
        """Queued nodes' names and outputs are taken: later fresh names must not meet them."""
        for node in nodes:
            self._reserve(node.name)
            for output in node.output:
                self._reserve(output)

    # -- constants ------------------------------------------------------------

    def add_initializer(self, value: np.ndarray, name: str) -> str:
        """Add `value` as initializer `name` (a name from `fresh_name`)."""
        self.ir.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.ir.initializers[name] = self.ir.graph.initializer[-1]
        self._reserve(name)
        return name

    def add_initializers(self, tensors) -> None:
        """Add ready TensorProtos (their names fresh)."""
        for tensor in tensors:
            self.ir.graph.initializer.append(tensor)
            self.ir.initializers[tensor.name] = self.ir.graph.initializer[-1]
            self._reserve(tensor.name)

    def set_constant(self, root, value: np.ndarray) -> None:
        """Replace the value of a constant root (`ir.const_root`), keeping its dtype."""
        kind, key = root
        if kind == "init":
            set_tensor_values(self.ir.initializers[key], value)
            return
        for attr in self.ir.nodes[key].attribute:
            if attr.name == "value":
                dtype = numpy_helper.to_array(attr.t).dtype
                attr.t.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), attr.t.name))
                return
        raise NotImplementedError("Constant node without a tensor value")

    def store_constants(self, new_values: dict) -> list[str]:
        """Write edited constants back: `new_values[(node, port)]` is the value
        that input should read. In place when every reader of the constant
        wants the same value, otherwise as a fresh initializer for the readers
        that differ. Returns the names written. `new_values` is emptied: each
        array is released once it is written (large weights, one at a time)."""
        self._check_index()
        written = []
        by_root = defaultdict(list)
        for (node, port), value in new_values.items():
            by_root[self.ir.const_root(self.ir.nodes[node].input[port])].append((node, port, value))
        new_values.clear()
        for root in list(by_root):
            edits = by_root.pop(root)
            readers = self._constant_readers(root)
            edited = {(node, port) for node, port, _ in edits}
            first = edits[0][2]
            uniform = all(v is first or (v.shape == first.shape and np.array_equal(v, first)) for _, _, v in edits)
            if uniform and readers <= edited:
                self.set_constant(root, first)
                written.append(self._root_name(root))
                continue
            for node, port, value in edits:
                written.append(self._add_clone(node, port, value))
        return written

    def _constant_readers(self, root) -> set[tuple[int, int]]:
        """Every (node, port) reading the constant, through Identity chains
        ((-1, -1) when it is a graph output)."""
        readers, frontier = set(), [self._root_name(root)]
        while frontier:
            tensor = frontier.pop()
            if tensor in self.ir.graph_outputs:
                readers.add((-1, -1))
            for use in self.ir.uses(tensor):
                node = self.ir.nodes[use.node]
                if node.op_type == "Identity":
                    frontier.append(node.output[0])
                else:
                    readers.add((use.node, use.port))
        return readers

    def _root_name(self, root) -> str:
        kind, key = root
        return key if kind == "init" else self.ir.nodes[key].output[0]

    def _add_clone(self, node: int, port: int, value: np.ndarray) -> str:
        original = self.ir.nodes[node].input[port]
        dtype = self.ir.const_value(original).dtype
        name = self.add_initializer(value.astype(dtype), self.fresh_name(f"{original}/widened"))
        self.set_input(node, port, name)
        return name

    # -- wiring ---------------------------------------------------------------

    def set_input(self, node: int, port: int, tensor: str) -> None:
        self._check_index()
        self.ir.nodes[node].input[port] = tensor

    def redirect_uses(self, tensor: str, new: str) -> None:
        """Every node reading `tensor` (as indexed) reads `new` instead. A
        read inside a subgraph cannot be redirected: callers refuse those
        first, and one reaching here raises rather than keep the old value."""
        uses = self.ir.uses(tensor)
        if any(use.port < 0 for use in uses):
            raise NotImplementedError(f"'{tensor}' is read inside a subgraph: its uses cannot be redirected")
        for use in uses:
            self.set_input(use.node, use.port, new)

    def rename_tensor(self, old: str, new: str) -> None:
        """Rename tensor `old` wherever nodes (queued ones too) and
        declarations name it; not inside subgraphs (a read there raises), nor
        graph inputs and outputs (the caller produces `old` again)."""
        if any(use.port < 0 for use in self.ir.uses(old)):
            raise NotImplementedError(f"'{old}' is read inside a subgraph: it cannot be renamed")
        queued = [node for nodes in self._before.values() for node in nodes] + self._appended
        for node in list(self.ir.graph.node) + queued:
            node.input[:] = [new if name == old else name for name in node.input]
            node.output[:] = [new if name == old else name for name in node.output]
        for value in self.ir.graph.value_info:
            if value.name == old:
                value.name = new

    @staticmethod
    def add_to_attribute(node: onnx.NodeProto, name: str, delta: int) -> None:
        """Add `delta` to an integer attribute (absent: its default 1)."""
        for attr in node.attribute:
            if attr.name == name:
                attr.i += delta
                return
        node.attribute.append(onnx.helper.make_attribute(name, 1 + delta))

    @staticmethod
    def scale_attribute(node: onnx.NodeProto, name: str, factor: float, default: float) -> None:
        """Multiply a float attribute by `factor` (absent: its `default`),
        rounded to float32 as onnx stores it."""
        for attr in node.attribute:
            if attr.name == name:
                attr.f = float(np.float32(attr.f * factor))
                return
        node.attribute.append(onnx.helper.make_attribute(name, float(np.float32(default * factor))))

    # -- node order -----------------------------------------------------------

    def insert_before(self, node: int, nodes: list[onnx.NodeProto]) -> None:
        """Queue `nodes` to run right before node `node` of the index."""
        self._check_index()
        self._before[node].extend(nodes)
        self._reserve_names_of(nodes)

    def insert_after_producer(self, tensor: str, nodes: list[onnx.NodeProto]) -> None:
        """Queue `nodes` right after the node producing `tensor` (first in
        the graph when a graph input or constant)."""
        producer = self.ir.producer_node(tensor)
        self.insert_before(0 if producer is None else producer + 1, nodes)

    def append(self, nodes: list[onnx.NodeProto]) -> None:
        """Queue `nodes` after every node of the graph."""
        self._appended.extend(nodes)
        self._reserve_names_of(nodes)

    def commit(self) -> None:
        """Apply the queued insertions in one rebuild of the node list."""
        if not self._before and not self._appended:
            return
        old = list(self.ir.graph.node)
        order = []
        for index, node in enumerate(old):
            order += self._before.pop(index, []) + [node]
        order += self._before.pop(len(old), []) + self._appended
        self._replace_nodes(order)
        self._appended = []

    def _check_index(self) -> None:
        if self._rebuilt:
            raise RuntimeError("the node list was rebuilt (commit): node indices of this "
                               "index no longer hold; edit through a fresh GraphIR and GraphEditor")

    def _replace_nodes(self, nodes: list[onnx.NodeProto]) -> None:
        # Copies first: clearing the repeated field would detach messages still in it.
        copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
        del self.ir.graph.node[:]
        self.ir.graph.node.extend(copies)
        self._rebuilt = True


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of `graph` reads, through its subgraphs too."""
    read = {name for node in graph.node for name in node.input if name}
    for node in graph.node:
        read |= outer_scope_reads(node)
    return read


@contextlib.contextmanager
def orphans_removed(handle):
    """Run a rewrite of `handle` (an `io.ModelHandle`); afterwards remove the
    nodes and initializers it orphaned: read before, read by nothing now."""
    read_before = _names_read(handle.graph) | {v.name for v in handle.graph.output}
    yield
    remove_orphans(handle.graph, read_before)


def remove_orphans(graph: onnx.GraphProto, read_before: set[str]) -> None:
    """Drop every node that had a reader (`read_before`) and has none now, then
    every initializer likewise (not those listed as graph inputs), repeating
    while removals orphan more."""
    outputs = {v.name for v in graph.output}
    while True:
        read = _names_read(graph) | outputs
        orphans = [i for i, node in enumerate(graph.node)
                   if any(o in read_before for o in node.output if o) and not any(o in read for o in node.output if o)]
        if not orphans:
            break
        for index in reversed(orphans):
            del graph.node[index]
    inputs = {v.name for v in graph.input}
    dropped = [i for i, t in enumerate(graph.initializer)
               if t.name in read_before and t.name not in read and t.name not in inputs]
    for index in reversed(dropped):
        del graph.initializer[index]

