"""onnxruntime sessions, set up one way.

Every model this tool runs (a whole model to verify, a region of one, the
channel labels of a routing simulation, an upcast copy) runs with graph
optimisations off: the comparison is of the graph as written, and the
optimisations cost more than they save on a model run once or twice.
onnxruntime's own log stays quiet; its errors reach the user as one line in
plain words (`plain_onnxruntime_error`), as a `ModelRunError`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

from .errors import UserError


class ModelRunError(UserError):
    """onnxruntime cannot load or run a model (the user's; see `verification.ours`).

    `kind` is the name of onnxruntime's exception type (Fail, InvalidArgument...).
    """

    def __init__(self, message: str, kind: str = ""):
        super().__init__(message)
        self.kind = kind


def session_options(base_dir: Path | None = None, *, prepack: bool = True, arrays: dict | None = None,
                    threads: int | None = None):
    """Options with optimisations and logging off.

    Args:
        base_dir: where the external data of an in-memory model lives.
        prepack: let onnxruntime re-lay out weights (off for a model run once).
        arrays: {initializer name: array} handed to onnxruntime as external
            initializers (no copy into the serialised model).
        threads: onnxruntime's intra-op threads (None: its default, one per
            core); 1 for tiny models, where starting a thread pool costs more
            than it saves.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # failures reach the user as our one line, not onnxruntime's log
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if base_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    if arrays:
        names = list(arrays)
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arrays[n]))
                                                  for n in names])
    return options


def make_session(model: onnx.ModelProto | str | Path, providers: list[str], base_dir: Path | None = None, *,
                 what: str = "the model", **options):
    """A session with `session_options` (further keyword arguments go there);
    `base_dir` is where the external data of an in-memory model lives.

    Raises:
        ModelRunError: onnxruntime cannot load the model (the reason in plain words).
    """
    import onnxruntime as ort

    in_memory = not isinstance(model, (str, Path))
    settings = session_options(base_dir if in_memory else None, **options)
    source = model.SerializeToString() if in_memory else str(model)
    try:
        return ort.InferenceSession(source, settings, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        raise ModelRunError(f"onnxruntime cannot load {what}: {plain_onnxruntime_error(exc)}",
                            type(exc).__name__) from None


def run_session(session, feeds, outputs: list[str] | None = None, *, what: str = "the model") -> list[np.ndarray]:
    """Run `session`; `ModelRunError` in plain words when it fails."""
    try:
        return [np.asarray(x) for x in session.run(outputs, feeds)]
    except Exception as exc:  # noqa: BLE001
        raise ModelRunError(f"onnxruntime failed to run {what}: {plain_onnxruntime_error(exc)}",
                            type(exc).__name__) from None


def plain_onnxruntime_error(exc: BaseException) -> str:
    """onnxruntime's message without its C++ source locations, and in plain
    words where the cause is a known one."""
    import onnxruntime as ort

    text = " ".join(str(exc).split()) or type(exc).__name__
    if match := re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", text):
        return (f"the model's IR version {match[1]} is newer than onnxruntime {ort.__version__} supports "
                f"(up to IR version {match[2]}): upgrade onnxruntime or re-export with an older onnx")
    if match := re.search(r"Opset (\d+) is under development.*support for domain (\S+) is till opset (\d+)", text):
        return (f"the model uses opset {match[1]} of {match[2]}, newer than onnxruntime {ort.__version__} "
                f"supports (up to opset {match[3]}): upgrade onnxruntime or export at an older opset")
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"\S+\.(?:h|cc|cpp):\d+ (?:[\w:<>,&*\s]+\([^)]*\) )?", "", text)
    return text[:300]
