"""scripts/benchmark_quality.py on a tiny generated root: both rows, OneNIP's row equal to the package's own
test of the same run, the learning curve drawn, the kNN baseline's pieces on hand-made inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY_MODEL

from onenip_pl.baselines.knn import gaussian_blur, greedy_coreset, nearest_distances

SCRIPT = REPO_ROOT / "scripts" / "benchmark_quality.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_epoch_on_a_tiny_root_gives_both_rows_and_the_packages_own_numbers(
    benchmark, tiny_demo_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "quality"
    arguments = [
        "--root",
        str(tiny_demo_root),
        "--epochs",
        "2",
        "--curve",
        "1",
        "--out",
        str(out),
        "logger=none",
        "progress=none",
        "data.image_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.persistent_workers=false",
        *TINY_MODEL,
        "callbacks.report.images_per_category=0",
        "callbacks.report.curves=false",
        "++callbacks.model_summary=null",
    ]
    assert benchmark.main(arguments) == 0
    report = json.loads((out / "quality.json").read_text())
    assert set(report) >= {"OneNIP", "kNN"}
    own_test = json.loads((out / "onenip" / "metrics.json").read_text())
    categories = sorted(own_test["per_category"])
    for method in ("OneNIP", "kNN"):
        results = report[method]["results"]
        assert sorted(results["per_category"]) == categories
        for name in benchmark.METRICS:
            assert 0.0 <= results["mean"][name] <= 1.0, (method, name)
        assert report[method]["wall_s"] > 0 and report[method]["cpu_s"] > 0
    for name in benchmark.METRICS:
        assert report["OneNIP"]["results"]["mean"][name] == pytest.approx(own_test["mean"][name], rel=1e-12)
    assert report["OneNIP"]["epochs"] == 2 and report["kNN"]["bank_patches"] > 0
    assert [point["epoch"] for point in report["curve"]] == [1.0], "the curve tests every epoch but the last"
    assert (out / "quality_curve.png").stat().st_size > 10_000
    assert (out / "quality_curve.csv").read_text().startswith("epoch,train_seconds,mean/image_AUROC")


def test_greedy_coreset_spreads_over_the_data_and_blur_keeps_the_mass() -> None:
    generator = torch.Generator().manual_seed(0)
    # two tight clusters of very different sizes: a 2-point coreset must take one of each
    features = torch.cat(
        [torch.randn(500, 8, generator=generator) * 0.01, 5 + torch.randn(5, 8, generator=generator) * 0.01]
    )
    chosen = greedy_coreset(features, 2, projection_dim=8, batch=1).tolist()
    assert len(set(chosen)) == 2 and sum(index >= 500 for index in chosen) == 1
    assert len(greedy_coreset(features, 50, batch=16)) == 50 and greedy_coreset(
        features, 999
    ).tolist() == list(range(505))
    maps = torch.zeros(1, 1, 40, 40)
    maps[0, 0, 20, 20] = 1.0
    blurred = gaussian_blur(maps, sigma=4.0)
    assert blurred.sum() == pytest.approx(1.0, rel=1e-4) and blurred.argmax() == maps.argmax()


def test_nearest_distances_equal_a_float64_brute_force_search() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(700, 48, generator=generator) + 2.0
    # more queries than one chunk, and a query lying on a bank row (distance 0 is not clamped below 0)
    queries = torch.cat([torch.randn(300, 48, generator=generator) + 2.0, bank[:1]])
    ours = nearest_distances(queries, bank, chunk=128)
    exact = torch.cdist(queries.double(), bank.double()).amin(dim=1)
    # float32 |q|^2 + |b|^2 - 2 q.b over d channels: each term rounds to within d * u of (|q| + |b|)^2
    extent = (queries.double().norm(dim=1).max() + bank.double().norm(dim=1).max()) ** 2
    squared_bound = (48 + 2) * 2.0**-24 * float(extent)
    assert float((ours.double().square() - exact.square()).abs().max()) <= squared_bound
    assert ours.shape == (301,) and float(ours[-1]) <= squared_bound**0.5
