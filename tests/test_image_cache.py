"""Decode-once image caches give the same pixels as decoding every time, and never go stale."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path, tiny_overrides

from onenip_pl.config import compose
from onenip_pl.data.datasets import ImageSource
from onenip_pl.data.readers import read_dataset
from onenip_pl.errors import ConfigError
from onenip_pl.train import train


def _train_records(root: Path):
    return [r for r in read_dataset("mvtec", root) if r.split == "train"]


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_images_equal_decoded_images(tiny_demo_root: Path, tmp_path: Path, mode: str) -> None:
    records = _train_records(tiny_demo_root)
    plain = ImageSource(records, 64)
    cached = ImageSource(records, 64, cache=mode, cache_dir=tmp_path / "cache")
    for _ in range(2):  # the second pass is served from the cache
        for index in range(len(records)):
            np.testing.assert_array_equal(cached.image(index), plain.image(index))
    if mode == "disk":
        assert len(list((tmp_path / "cache" / "64px").rglob("*.npy"))) == len(records)


def test_disk_cache_notices_a_changed_file(tiny_demo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    records = _train_records(root)
    source = ImageSource(records, 64, cache="disk", cache_dir=tmp_path / "cache")
    before = source.image(0).copy()
    replacement = records[1].path
    shutil.copyfile(replacement, records[0].path)
    stat = os.stat(records[0].path)
    os.utime(records[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = source.image(0)
    np.testing.assert_array_equal(after, ImageSource(records, 64).image(1))
    assert not np.array_equal(before, after)


def test_unknown_cache_mode_is_rejected(tiny_demo_root: Path) -> None:
    with pytest.raises(ConfigError, match="cache_images"):
        ImageSource(_train_records(tiny_demo_root), 64, cache="ssd")


@pytest.mark.parametrize("reader", ["mvtec", "folder"])
def test_real_hazelnut_images_train_and_test(tmp_path: Path, reader: str) -> None:
    root = shared_path("data", "hazelnut_toy")
    cfg = compose(
        "train",
        tiny_overrides(root, tmp_path, "logger=none", f"data.dataset={reader}", "data.cache_images=memory"),
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/image_AUROC"] <= 1.0
    assert (tmp_path / "metrics.json").is_file()
