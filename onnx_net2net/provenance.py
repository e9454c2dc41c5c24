"""Provenance: what onnx_net2net did to a model, kept in its metadata_props.

Keys: `onnx_net2net.version`, and `onnx_net2net.history`, a JSON list with
one entry per run (pass, options, what changed), so a model grown several
times over its life still says how it got its shape.
"""

from __future__ import annotations

import json

import onnx

from . import __version__

HISTORY_KEY = "onnx_net2net.history"
VERSION_KEY = "onnx_net2net.version"


def record_provenance(model: onnx.ModelProto, report: dict) -> None:
    entry = {key: report[key] for key in ("pass", "options", "command") if key in report}
    if "steps" in report:
        entry["steps"] = [{key: step.get(key) for key in ("pass", "options")} for step in report["steps"]]
    entry["changes"] = [_summary(change) for change in report.get("changes", [])]
    history = json.loads(_get(model, HISTORY_KEY) or "[]")
    history.append(entry)
    _set(model, HISTORY_KEY, json.dumps(history, default=str))
    _set(model, VERSION_KEY, __version__)


def history(model: onnx.ModelProto) -> list:
    return json.loads(_get(model, HISTORY_KEY) or "[]")


def _summary(change: dict) -> dict:
    keys = ("layers", "old_width", "new_width", "after", "mode", "activation", "nodes")
    return {key: change[key] for key in keys if key in change}


def _get(model: onnx.ModelProto, key: str) -> str | None:
    for prop in model.metadata_props:
        if prop.key == key:
            return prop.value
    return None


def _set(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value
