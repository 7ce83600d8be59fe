"""The one way the package opens a checkpoint file: ``torch.load(weights_only=True)``, never running code.

A checkpoint is a pickle, and a pickle can name any Python callable to run while it loads (a crafted
``.ckpt`` calling ``os.system`` is a few lines). With ``weights_only=True`` torch's unpickler accepts
tensors and plain containers only and refuses everything else before it is called. Every entry point and
API that reads a checkpoint (train resume, eval, calibrate, enroll, predict, export, convert, the
detector, backbone weights) goes through :func:`read_checkpoint`; there is no switch to turn it off.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import re
import typing
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

from onenip_pl.errors import CheckpointError

# Checkpoints of onenip-pl 0.1 before hyper-parameters were written as plain containers hold OmegaConf
# lists and dicts: value classes whose unpickling sets attributes and calls nothing else.
_OMEGACONF_VALUE_CLASSES = [
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    AnyNode,
    BooleanNode,
    FloatNode,
    IntegerNode,
    StringNode,
    typing.Any,
    collections.defaultdict,
    dict,
    list,
    int,
]
# torch names the callable it refused: "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose ..."
_REFUSED_GLOBAL = re.compile(r"unsupported(?: global:)? GLOBAL ([\w.]+)", re.IGNORECASE)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dict; a CheckpointError whose one-line message names the file says why not."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory; pass the .ckpt file in it, e.g. {path}/checkpoints/last.ckpt"
        )
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass the .ckpt written by training, calibrate or convert."
        )
    try:
        with torch.serialization.safe_globals(_OMEGACONF_VALUE_CLASSES):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _REFUSED_GLOBAL.search(str(error))
        if found is None:
            raise _unreadable(path, "its bytes are no pickle of tensors") from error
        raise CheckpointError(
            f"checkpoint {path} is refused: it holds objects other than tensors and plain containers (it "
            f"calls {found.group(1)}), and unpickling them could run arbitrary code. Use a checkpoint "
            "written by onenip-pl, or `python -m onenip_pl.convert` for the authors' files."
        ) from error
    except Exception as error:  # a file that is not a checkpoint fails in whatever way its bytes lead to
        raise _unreadable(path, error) from error
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(loaded).__name__}, not a checkpoint dict.")
    return loaded


def _unreadable(path: Path, error: BaseException | str) -> CheckpointError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # torch's own sentences follow the first one (advice on miniz, on weights_only): that one is the fact
    detail = detail.split(". ")[0]
    return CheckpointError(
        f"checkpoint {path} is not a readable torch checkpoint (truncated, or not a checkpoint at all: "
        f"{detail}); copy it again or point to another file."
    )


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex): the identity of a checkpoint a result came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_of(checkpoint: typing.Mapping) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint dict (its ``state_dict`` entry), or the dict itself if it is one."""
    state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    if not isinstance(state_dict, typing.Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise CheckpointError(
            "the checkpoint is neither a state dict of tensors nor a dict whose 'state_dict' entry is one."
        )
    return dict(state_dict)
