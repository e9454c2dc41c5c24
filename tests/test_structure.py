"""The package's module structure (tools/check_imports.py): the analysis and
the rewrites import one way, no module imports another's private names."""

from __future__ import annotations

from helpers import ROOT, tool_module


def _check_imports():
    return tool_module("check_imports")


def test_no_private_names_cross_modules():
    tool = _check_imports()
    _, private = tool.import_graph(tool.module_names(ROOT / "onnx_net2net"))
    assert private == []


def test_the_analysis_and_rewrites_are_in_no_import_cycle():
    tool = _check_imports()
    graph, _ = tool.import_graph(tool.module_names(ROOT / "onnx_net2net"))
    ours = ("onnx_net2net.analysis", "onnx_net2net.rewrites", "onnx_net2net.ops", "onnx_net2net.passes")
    assert [c for c in tool.cycles(graph) if any(m.startswith(ours) for m in c)] == []


def test_no_analysis_module_is_over_the_limit():
    tool = _check_imports()
    modules = {name: path for name, path in tool.module_names(ROOT / "onnx_net2net").items()
               if name.startswith(("onnx_net2net.analysis", "onnx_net2net.rewrites"))}
    assert tool.long_modules(modules, skip=set()) == []


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    tool = _check_imports()
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import f\n")
    (package / "b.py").write_text("def f():\n    from .a import _g\n")
    graph, private = tool.import_graph(tool.module_names(package))
    assert tool.cycles(graph) == [["pkg.a", "pkg.b"]]
    assert len(private) == 1 and "_g" in private[0]
