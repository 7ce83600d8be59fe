"""Optional extras: a command that needs one checks for it before doing any work and names the
``pip install`` to run, instead of failing deep inside a library with a traceback."""

from __future__ import annotations

import importlib.util

from onenip_pl.errors import ConfigError

EXTRAS = {
    # exporting to ONNX and checking the exported graph in onnxruntime
    "deploy": ("onnx", "onnxruntime"),
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, needed_for: str) -> None:
    """ConfigError naming the missing packages and ``pip install 'onenip-pl[extra]'``."""
    missing = [name for name in EXTRAS[extra] if not _importable(name)]
    if missing:
        raise ConfigError(
            f"{needed_for} needs {' and '.join(missing)}, which are not installed: "
            f"pip install 'onenip-pl[{extra}]'"
        )
