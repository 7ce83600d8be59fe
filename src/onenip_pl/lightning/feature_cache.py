"""Frozen-backbone feature cache: a training step runs the backbone on the synthetic anomalies only.

Why it is exact: the backbone is frozen and always in eval mode, and the training set serves its queries
and prompts un-augmented (``TrainTripletDataset.augments_normals`` is False), so the features of normal
training image i never change. Caching them removes two thirds of the backbone's work per step (queries
and prompts) and leaves the maths as it was.

Two guards keep it honest. Every cached entry remembers a signature of the image it came from (a fixed
sample of its pixels); a batch whose image no longer matches (an augmentation, a changed file, a stale
on-disk cache) raises a DataError instead of training on wrong features. And the signatures are checked
on the host before the batch goes to the device, so the check never waits for the accelerator.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from onenip_pl.errors import ConfigError, DataError, check_choice

FEATURE_CACHE_MODES = ("none", "memory", "disk")
SIGNATURE_SIZE = 256
INDEX_KEYS = ("query_index", "prompt_index")


def image_signatures(images: Tensor) -> Tensor:
    """SIGNATURE_SIZE pixel values per image at fixed, evenly spread positions (float32, CPU)."""
    flat = images.detach().flatten(1)
    positions = torch.linspace(0, flat.shape[1] - 1, SIGNATURE_SIZE, device=flat.device).long()
    return flat[:, positions].float().cpu()


def cache_bytes(num_images: int, feature_shape: Sequence[int], bytes_per_value: int = 4) -> int:
    """Memory (or disk) a full cache takes: images x C x h x w x bytes per value."""
    return num_images * int(np.prod(feature_shape)) * bytes_per_value


def backbone_fingerprint(net: torch.nn.Module) -> str:
    """A short hash of everything the cached features depend on: backbone weights, input size, statistics.

    An on-disk cache lives in a folder named by it, so another backbone or image size never reads it.
    """
    digest = hashlib.sha256()
    digest.update(f"{net.backbone.name}|{net.image_size}|{net.backbone.official_padding}".encode())
    for name, tensor in [("pixel_mean", net.pixel_mean), ("pixel_std", net.pixel_std)] + sorted(
        net.backbone.state_dict().items()
    ):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCache(ABC):
    """Features of normal training images by their index in the training set, one C x h x w entry each."""

    def __init__(self) -> None:
        self._signatures: dict[int, Tensor] = {}

    @abstractmethod
    def __contains__(self, index: int) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Entry `index` on `device` in `dtype`."""

    @abstractmethod
    def store(self, index: int, features: Tensor) -> None:
        """Keep the C x h x w features of image `index` (its signature must be known)."""

    def stored_signature(self, index: int) -> Tensor | None:
        """The signature an entry was written with, when the entry comes from elsewhere (disk)."""
        return None

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Indices to Python lists and the normal images checked against their signatures.

        Meant to run on the host before the batch moves to the device (LightningModule's
        on_before_batch_transfer), where reading indices and comparing pixels costs no synchronisation.
        """
        for key, images_key in zip(INDEX_KEYS, ("query", "prompt"), strict=True):
            if key not in batch:
                raise DataError(
                    f"model.feature_cache needs '{key}' in each training batch (TrainTripletDataset "
                    "provides it); set model.feature_cache=none for other datasets."
                )
            if isinstance(batch[key], Tensor):
                batch[key] = [int(i) for i in batch[key].tolist()]
                self.check_images(batch[key], batch[images_key])
        return batch

    def check_images(self, indices: Sequence[int], images: Tensor) -> None:
        """Raise when an image differs from the one its index had before (or had in the disk cache)."""
        for index, signature in zip(indices, image_signatures(images), strict=True):
            known = self._signatures.get(index)
            if known is None:
                known = self.stored_signature(index)
                self._signatures[index] = signature if known is None else known
            if known is not None and not torch.equal(known, signature):
                raise DataError(
                    f"training image {index} differs from the one whose features were cached: queries and "
                    f"prompts must not be augmented with model.feature_cache, and an on-disk cache must "
                    f"belong to this data set ({self.describe()}). Delete a stale cache folder, or set "
                    "model.feature_cache=none."
                )

    def describe(self) -> str:
        return f"{type(self).__name__} with {len(self)} entries"

    def triplet_features(self, net: torch.nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(query, synthetic, prompt) features; the backbone runs on the anomalies and on cache misses only.

        A miss (an image seen for the first time) is computed in the same backbone call as the anomalies
        and stored; each distinct image is computed once even when it is both a query and a prompt.
        """
        batch = self.prepare_batch(batch)
        synthetic = batch["synthetic"]
        missing: dict[int, Tensor] = {}
        for key, images_key in zip(INDEX_KEYS, ("query", "prompt"), strict=True):
            for position, index in enumerate(batch[key]):
                if index not in missing and index not in self:
                    missing[index] = batch[images_key][position]
        computed = net.extract_features(torch.cat([synthetic, *(image[None] for image in missing.values())]))
        synthetic_features, fresh = computed.split([synthetic.shape[0], len(missing)])
        fresh_by_index = dict(zip(missing, fresh, strict=True))
        for index, features in fresh_by_index.items():
            self.store(index, features)

        def gather(indices: Iterable[int]) -> Tensor:
            device, dtype = computed.device, computed.dtype
            return torch.stack(
                [fresh_by_index[i] if i in fresh_by_index else self.load(i, device, dtype) for i in indices]
            )

        return gather(batch["query_index"]), synthetic_features, gather(batch["prompt_index"])


class MemoryFeatureCache(FeatureCache):
    """Entries kept on the device they were computed on (GPU memory when training on a GPU).

    Each process (DDP rank) fills its own cache with the images it sees.
    """

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[int, Tensor] = {}

    def __contains__(self, index: int) -> bool:
        return index in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, index: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return self._entries[index].to(device=device, dtype=dtype)

    def store(self, index: int, features: Tensor) -> None:
        # a copy, so the entry does not keep the whole batch's feature tensor alive
        self._entries[index] = features.detach().clone()


class DiskFeatureCache(FeatureCache):
    """One ``<index>.npz`` (features as float32 and the image signature) per image under ``directory``.

    Files are written atomically (temporary file, then rename), so DDP ranks sharing the folder never read
    half a file; a later run with the same backbone and image size starts with every entry present.
    Reading goes through pinned memory without waiting for a GPU; writing a new entry copies it to the host,
    which waits for the GPU, but only on the steps that meet an image for the first time.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        super().__init__()
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"cannot create the feature cache folder {self.directory} ({error}); "
                "set model.feature_cache_dir to a writable folder."
            ) from error
        self._present: set[int] = set()

    def _path(self, index: int) -> Path:
        return self.directory / f"{index}.npz"

    def __contains__(self, index: int) -> bool:
        if index in self._present:
            return True
        if self._path(index).is_file():
            self._present.add(index)
            return True
        return False

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*.npz"))

    def _read(self, index: int, member: str) -> np.ndarray:
        path = self._path(index)
        try:
            with np.load(path) as entry:
                return entry[member]
        except (OSError, ValueError, KeyError) as error:
            raise DataError(
                f"feature cache file {path} is unreadable ({error}); delete it (it is rebuilt on use)."
            ) from error

    def stored_signature(self, index: int) -> Tensor | None:
        return torch.from_numpy(self._read(index, "signature")) if index in self else None

    def load(self, index: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        features = torch.from_numpy(self._read(index, "features"))
        if device.type == "cuda":
            # pinned memory and an asynchronous copy: no wait for the GPU's queue
            return features.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
        return features.to(dtype=dtype)

    def store(self, index: int, features: Tensor) -> None:
        path = self._path(index)
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        signature = self._signatures.get(index)
        if signature is None:
            raise DataError(f"training image {index} has no signature; call prepare_batch before storing")
        with open(temporary, "wb") as handle:
            np.savez(handle, features=features.detach().float().cpu().numpy(), signature=signature.numpy())
        os.replace(temporary, path)
        self._present.add(index)

    def describe(self) -> str:
        return f"on-disk feature cache {self.directory}"


def build_feature_cache(
    mode: str, net: torch.nn.Module, directory: str | os.PathLike | None = None
) -> FeatureCache | None:
    """None for ``mode="none"``; a disk cache goes to ``<directory>/<backbone fingerprint>``."""
    check_choice("model.feature_cache", mode, FEATURE_CACHE_MODES)
    if mode == "none":
        return None
    if mode == "memory":
        return MemoryFeatureCache()
    if directory is None:
        raise ConfigError("model.feature_cache=disk needs a folder: set model.feature_cache_dir.")
    return DiskFeatureCache(Path(directory) / backbone_fingerprint(net))


def triplet_features(
    net: torch.nn.Module, batch: dict[str, Any], cache: FeatureCache | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(query, synthetic, prompt) neck features of a training batch: from the cache where it holds them,
    else from one backbone call on all three."""
    if cache is not None:
        return cache.triplet_features(net, batch)
    features = net.extract_features(torch.cat([batch["query"], batch["synthetic"], batch["prompt"]]))
    return features.split(batch["query"].shape[0])


def check_cached_training(mode: str, dataset: Any, net: torch.nn.Module, precision: str) -> str:
    """The log line announcing the cache's size, after checking that ``dataset`` serves its queries and
    prompts un-augmented, without which the cached features would be wrong (ConfigError otherwise)."""
    if getattr(dataset, "augments_normals", True):
        raise ConfigError(
            f"model.feature_cache={mode} needs a training set that serves its queries and prompts "
            f"un-augmented, and {type(dataset).__name__} does not declare augments_normals=False; "
            "set model.feature_cache=none."
        )
    shape = (net.feature_channels, net.feature_size, net.feature_size)
    bytes_per_value = 2 if str(precision).startswith(("16", "bf16")) else 4
    return describe_cache_size(mode, len(dataset), shape, bytes_per_value)


def describe_cache_size(
    mode: str, num_images: int, feature_shape: Sequence[int], bytes_per_value: int = 4
) -> str:
    """The log line announcing what a full cache will take, in memory or on disk."""
    where = "on disk" if mode == "disk" else "in memory per process (GPU memory when training on a GPU)"
    size = cache_bytes(num_images, feature_shape, 4 if mode == "disk" else bytes_per_value)
    shape = "x".join(str(d) for d in feature_shape)
    return (
        f"Feature cache ({mode}): up to {num_images} normal training images x {shape} features "
        f"= {size / 2**30:.2f} GiB {where}"
    )
