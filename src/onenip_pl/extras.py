"""Optional extras: a command that needs one checks for it before doing any work and names the
``pip install`` to run, instead of failing deep inside a library with a traceback."""

from __future__ import annotations

import importlib.util

from onenip_pl.errors import ConfigError

EXTRAS = {
    # exporting to ONNX / OpenVINO IR, checking the exported graph, the detector's compiled runtimes,
    # and the inspection server
    "deploy": ("onnx", "onnxruntime", "openvino", "litserve", "python_multipart"),
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, needed_for: str, packages: tuple[str, ...] | None = None) -> None:
    """ConfigError naming the missing packages and ``pip install 'onenip-pl[extra]'``; ``packages``: the
    ones this use needs (default: all of the extra's)."""
    missing = [name for name in (packages or EXTRAS[extra]) if not _importable(name)]
    if missing:
        raise ConfigError(
            f"{needed_for} needs {' and '.join(missing)}, which are not installed: "
            f"pip install 'onenip-pl[{extra}]'"
        )
