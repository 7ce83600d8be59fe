"""The metric suite against scikit-learn and a direct, slow AUPRO reference, ties included."""

from __future__ import annotations

import json
import math
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from onenip_pl.errors import ConfigError, DataError
from onenip_pl.metrics import (
    ALL_METRICS,
    IMAGE_METRICS,
    PIXEL_METRICS,
    AnomalyMetrics,
    MetricUndefinedWarning,
    area_under_pro,
    auroc,
    average_precision,
    compute_category_metrics,
    f1_max,
    region_weights,
    summarize,
    sweep_binned,
    sweep_exact,
)
from onenip_pl.metrics.ranking import quantise

# ---------------------------------------------------------------- references


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(f1.max())


def sklearn_metrics(level: str, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    labels, scores = labels.ravel().astype(bool), scores.ravel().astype(np.float64)
    return {
        f"{level}_AUROC": roc_auc_score(labels, scores),
        f"{level}_AP": average_precision_score(labels, scores),
        f"{level}_F1max": sklearn_f1_max(labels, scores),
    }


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Threshold by threshold: FPR over normal pixels, PRO as the mean overlap of every 8-connected
    ground-truth region; then the trapezoidal area up to ``fpr_limit`` (interpolated there), normalised."""
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions += [(index, labelled == k) for k in range(1, count + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = np.sum(predicted & normal) / np.sum(normal)
        pro = np.mean([predicted[index][region].mean() for index, region in regions])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    inside = int(np.sum(fpr <= fpr_limit))
    x, y = list(fpr[:inside]), list(pro[:inside])
    if x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        x.append(fpr_limit)
        y.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.trapezoid(y, x)) / fpr_limit


# ---------------------------------------------------------------- synthetic data


def blob_masks(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Irregular blobs from thresholded smooth noise, plus diagonal-only contacts that 4-connectivity
    would split; about a third of the images stay normal."""
    masks = np.zeros((count, size, size), dtype=bool)
    for index in range(count):
        if index % 3 == 0:
            continue
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=2.0)
        masks[index] = noise > np.quantile(noise, 0.9)
        row, column = rng.integers(1, size - 2, size=2)
        masks[index, row, column] = masks[index, row + 1, column + 1] = True
    return masks


def correlated_maps(rng: np.random.Generator, masks: np.ndarray) -> np.ndarray:
    signal = ndimage.uniform_filter(masks.astype(np.float32), size=(1, 3, 3))
    return (signal + rng.normal(scale=0.6, size=masks.shape)).astype(np.float32)


def tied(values: np.ndarray, levels: int) -> np.ndarray:
    """Few distinct values, so most samples tie with many others."""
    low, high = values.min(), values.max()
    return (np.round((values - low) / (high - low) * (levels - 1)) / (levels - 1)).astype(np.float32)


def assert_close(actual: dict[str, float], expected: dict[str, float], tolerance: float) -> None:
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, abs=tolerance), name


# ---------------------------------------------------------------- ranking metrics vs scikit-learn


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 2, 7])
def test_image_metrics_equal_sklearn(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = (labels + rng.normal(scale=1.0, size=60)).astype(np.float32)
    if levels:
        scores = tied(scores, levels)
    ours = compute_category_metrics(torch.from_numpy(scores), torch.from_numpy(labels), metrics=IMAGE_METRICS)
    assert_close(ours, sklearn_metrics("image", labels, scores), 1e-9)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 3, 50])
def test_pixel_metrics_equal_sklearn(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 6, 24)
    maps = correlated_maps(rng, masks)
    if levels:
        maps = tied(maps, levels)
    ours = compute_category_metrics(
        torch.ones(6), torch.tensor([0, 1, 1, 0, 1, 1]), torch.from_numpy(maps), torch.from_numpy(masks),
        metrics=PIXEL_METRICS[:3],
    )
    assert_close(ours, sklearn_metrics("pixel", masks, maps), 1e-9)


def test_constant_maps_tie_everywhere_like_sklearn() -> None:
    masks = blob_masks(np.random.default_rng(5), 3, 16)
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, :2] = -0.0  # equal to +0.0, must not be ranked apart
    ours = compute_category_metrics(
        torch.zeros(3), torch.tensor([0, 1, 1]), torch.from_numpy(maps), torch.from_numpy(masks),
        metrics=PIXEL_METRICS,
    )
    assert_close(ours, sklearn_metrics("pixel", masks, maps), 1e-12)
    assert ours["pixel_AUROC"] == 0.5
    assert ours["pixel_AUPRO"] == pytest.approx(reference_aupro(maps, masks), abs=1e-12)


def test_auroc_below_half_is_not_flipped() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([0.9, 0.8, 0.3, 0.2, 0.4, 0.1])
    ours = compute_category_metrics(scores, labels, metrics=["image_AUROC"])
    assert ours["image_AUROC"] == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    assert ours["image_AUROC"] < 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_other_score_dtypes_rank_their_exact_values(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(11)
    labels = rng.random(80) < 0.5
    scores = torch.from_numpy((labels + rng.normal(size=80)) * 10).to(dtype)
    ours = compute_category_metrics(scores, torch.from_numpy(labels), metrics=IMAGE_METRICS)
    assert_close(ours, sklearn_metrics("image", labels, scores.double().numpy()), 1e-9)


def test_huge_finite_maps_are_accepted() -> None:
    masks = torch.tensor([[[1, 0, 0, 1]]], dtype=torch.bool)
    maps = torch.tensor([[[3e38, 2e38, 1e38, 3e38]]])  # their float32 sum overflows, the values do not
    ours = compute_category_metrics(torch.ones(1), torch.ones(1), maps, masks, metrics=["pixel_AUROC"])
    assert ours["pixel_AUROC"] == 1.0
    full_range = torch.tensor([[[3e38, -3e38, -3e38, 3e38]]])  # max - min overflows float32
    binned = compute_category_metrics(
        torch.ones(1), torch.ones(1), full_range, masks, metrics=["pixel_AUROC"], binned=True
    )
    assert binned["pixel_AUROC"] == 1.0


def test_negative_and_mixed_sign_scores_rank_correctly() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0, 0, 1], dtype=bool)
    scores = np.array([-3.5, -0.25, -1e-30, 2.0, -0.25, 1e30, 0.0, -7.0], dtype=np.float32)
    ours = compute_category_metrics(torch.from_numpy(scores), torch.from_numpy(labels), metrics=IMAGE_METRICS)
    assert_close(ours, sklearn_metrics("image", labels, scores), 1e-12)


# ---------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 4])
def test_aupro_equals_direct_reference(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 6, 20)
    maps = correlated_maps(rng, masks)
    if levels:
        maps = tied(maps, levels)
    ours = compute_category_metrics(
        torch.zeros(6), torch.tensor([0, 1, 1, 0, 1, 1]), torch.from_numpy(maps), torch.from_numpy(masks),
        metrics=["pixel_AUPRO"],
    )
    assert ours["pixel_AUPRO"] == pytest.approx(reference_aupro(maps, masks), abs=1e-4)


def test_aupro_by_hand() -> None:
    # One region of 2 pixels. Thresholds 0.9 / 0.5 / 0.1 / 0.0 give (FPR, PRO) = (0, .5), (.5, .5),
    # (.5, 1), (1, 1): up to FPR 0.3 the curve is flat at 0.5, so the normalised area is 0.5.
    maps = torch.tensor([[[0.9, 0.1, 0.5, 0.0]]])
    masks = torch.tensor([[[1, 1, 0, 0]]])
    ours = compute_category_metrics(torch.zeros(1), torch.ones(1), maps, masks, metrics=["pixel_AUPRO"])
    assert ours["pixel_AUPRO"] == pytest.approx(0.5, abs=1e-12)


def test_regions_are_eight_connected() -> None:
    # A diagonal pair is one region (8-connectivity), the lone pixel another: weights 1/4, 1/4, 1/2.
    # 4-connectivity would give three regions of weight 1/3 each.
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 4, 4] = True
    assert region_weights(mask).tolist() == pytest.approx([0.25, 0.25, 0.5])


def test_aupro_interpolates_at_the_fpr_limit() -> None:
    # 10 normal pixels: after the 3 highest-scoring normal ones FPR is exactly 0.3 (no interpolation);
    # with 7 normal pixels FPR jumps from 2/7 to 3/7 and the limit is interpolated.
    for normal_count in (10, 7):
        maps = torch.cat([torch.tensor([5.0, 1.5]), torch.linspace(4.0, 0.0, normal_count)]).view(1, 1, -1)
        masks = torch.zeros_like(maps, dtype=torch.bool)
        masks[..., :2] = True
        ours = compute_category_metrics(torch.zeros(1), torch.ones(1), maps, masks, metrics=["pixel_AUPRO"])
        assert ours["pixel_AUPRO"] == pytest.approx(reference_aupro(maps.numpy(), masks.numpy()), abs=1e-12)


# ---------------------------------------------------------------- undefined metrics


def test_one_class_category_gives_nan_and_a_warning() -> None:
    maps = torch.rand(4, 8, 8)
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    with pytest.warns(MetricUndefinedWarning) as record:
        ours = compute_category_metrics(torch.rand(4), torch.zeros(4), maps, masks, category="bottle")
    messages = sorted(str(warning.message) for warning in record)
    assert len(messages) == 2
    assert messages[0].startswith("category 'bottle': image_AUROC, image_AP, image_F1max undefined")
    assert "all 4 images are normal" in messages[0]
    assert "all 256 pixels are normal" in messages[1]
    assert list(ours) == list(ALL_METRICS)
    assert all(math.isnan(value) for value in ours.values())


def test_only_anomalous_pixels_give_nan() -> None:
    with pytest.warns(MetricUndefinedWarning, match="pixels are anomalous"):
        ours = compute_category_metrics(
            torch.tensor([0.1, 0.9]), torch.tensor([0, 1]), torch.rand(2, 3, 3), torch.ones(2, 3, 3),
        )
    assert all(math.isnan(ours[name]) for name in PIXEL_METRICS)
    assert ours["image_AUROC"] == 1.0


# ---------------------------------------------------------------- binned mode


def test_binned_equals_exact_on_quantised_scores() -> None:
    rng = np.random.default_rng(3)
    masks = torch.from_numpy(blob_masks(rng, 5, 16))
    maps = torch.from_numpy(correlated_maps(rng, masks.numpy()))
    weights = region_weights(masks)
    binned = sweep_binned(maps, masks, 64, weights)
    exact = sweep_exact(quantise(maps.reshape(-1), 64), masks, weights)
    for metric in (auroc, average_precision, f1_max, area_under_pro):
        assert metric(binned) == pytest.approx(metric(exact), abs=1e-12)


def test_binned_is_close_to_exact_with_a_fine_grid() -> None:
    rng = np.random.default_rng(4)
    masks = torch.from_numpy(blob_masks(rng, 6, 32))
    maps = torch.from_numpy(correlated_maps(rng, masks.numpy()))
    args = (torch.rand(6), torch.tensor([0, 1, 1, 0, 1, 1]), maps, masks)
    exact = compute_category_metrics(*args, metrics=PIXEL_METRICS)
    binned = compute_category_metrics(*args, metrics=PIXEL_METRICS, binned=True, num_bins=20_000)
    coarse = compute_category_metrics(*args, metrics=PIXEL_METRICS, binned=True, num_bins=8)
    assert_close(binned, exact, 2e-3)
    assert any(abs(coarse[name] - exact[name]) > 1e-3 for name in PIXEL_METRICS)


# ---------------------------------------------------------------- input checks


def test_bad_inputs_raise_clear_errors() -> None:
    scores, labels, maps = torch.rand(2), torch.tensor([0, 1]), torch.rand(2, 4, 4)
    with pytest.raises(ConfigError, match="pixel_AUROC"):
        compute_category_metrics(scores, labels, maps, maps > 0.5, metrics=["pixel_auroc"])
    with pytest.raises(DataError, match="0/255"):
        compute_category_metrics(scores, labels, maps, (maps > 0.5).to(torch.uint8) * 255)
    with pytest.raises(DataError, match="NaN"):
        compute_category_metrics(scores, labels, torch.full((2, 4, 4), math.nan), maps > 0.5)
    with pytest.raises(DataError, match="same size"):
        compute_category_metrics(scores, labels, maps, torch.zeros(2, 4, 5, dtype=torch.bool))
    with pytest.raises(DataError, match="2 image scores but 3 anomaly maps"):
        compute_category_metrics(scores, labels, torch.rand(3, 4, 4), torch.rand(3, 4, 4) > 0.5)
    with pytest.raises(DataError, match="need anomaly_maps"):
        compute_category_metrics(scores, labels)
    with pytest.raises(ConfigError, match="num_bins"):
        compute_category_metrics(scores, labels, metrics=IMAGE_METRICS, binned=True, num_bins=1)


# ---------------------------------------------------------------- summarize


def test_summarize_means_over_categories_skipping_nan_with_a_warning() -> None:
    per_category = {
        "a": {"image_AUROC": 0.5, "pixel_AP": 0.2},
        "b": {"image_AUROC": 1.0, "pixel_AP": math.nan},
        "c": {"image_AUROC": 0.75, "pixel_AP": 0.4},
    }
    with pytest.warns(MetricUndefinedWarning, match="pixel_AP is over 2 of 3 categories.*: b"):
        summary = summarize(per_category)
    assert summary["per_category"]["a"] == per_category["a"]
    assert math.isnan(summary["per_category"]["b"]["pixel_AP"])
    assert summary["mean"]["image_AUROC"] == pytest.approx(0.75)
    assert summary["mean"]["pixel_AP"] == pytest.approx(0.3)


def test_summarize_all_nan_is_nan() -> None:
    with pytest.warns(MetricUndefinedWarning):
        summary = summarize({"a": {"image_AUROC": math.nan}})
    assert math.isnan(summary["mean"]["image_AUROC"])


# ---------------------------------------------------------------- torchmetrics Metric


def mixed_test_set(seed: int = 0, size: int = 12) -> dict[str, torch.Tensor | list[str]]:
    """Nine images of three interleaved categories; 'toothbrush' has no anomalous image."""
    rng = np.random.default_rng(seed)
    categories = ["bottle", "cable", "toothbrush"] * 3
    masks = blob_masks(rng, 9, size)
    masks[2::3] = False
    labels = torch.from_numpy(masks.reshape(9, -1).any(axis=1)).to(torch.int64)
    maps = torch.from_numpy(correlated_maps(rng, masks))
    return {
        "image_scores": maps.amax(dim=(1, 2)),
        "image_labels": labels,
        "anomaly_maps": maps[:, None],
        "masks": torch.from_numpy(masks)[:, None],
        "categories": categories,
    }


def take(batch: dict, rows: slice) -> dict:
    return {key: value[rows] for key, value in batch.items()}


def assert_same_results(actual: dict, expected: dict) -> None:
    assert json.dumps(actual, sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_metric_accumulates_batches_like_one_call() -> None:
    batch = mixed_test_set(size=13)  # 13 x 13 is not a multiple of 8: exercises the mask bit packing
    whole, split = AnomalyMetrics(), AnomalyMetrics()
    whole.update(**batch)
    split.update(**take(batch, slice(0, 4)))
    split.update(**take(batch, slice(4, None)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        expected_bottle = compute_category_metrics(
            batch["image_scores"][0::3], batch["image_labels"][0::3],
            batch["anomaly_maps"][0::3], batch["masks"][0::3],
        )
        results_whole, results_split = whole.compute(), split.compute()
    assert_same_results(results_whole, results_split)
    assert list(results_whole["per_category"]) == ["bottle", "cable", "toothbrush"]
    assert results_whole["per_category"]["bottle"] == expected_bottle
    assert math.isnan(results_whole["per_category"]["toothbrush"]["image_AUROC"])
    data = split.category_data()
    assert torch.equal(data["cable"].masks, batch["masks"][1::3, 0])
    assert torch.equal(data["cable"].anomaly_maps, batch["anomaly_maps"][1::3, 0])


def test_metric_image_only_needs_no_maps() -> None:
    metric = AnomalyMetrics(metrics=IMAGE_METRICS)
    metric.update(torch.tensor([0.1, 0.7, 0.4]), torch.tensor([0, 1, 1]), None, None, ["a", "a", "a"])
    assert metric.compute()["mean"] == {"image_AUROC": 1.0, "image_AP": 1.0, "image_F1max": 1.0}


def test_metric_rejects_inconsistent_batches() -> None:
    metric = AnomalyMetrics()
    batch = mixed_test_set()
    metric.update(**batch)
    with pytest.raises(DataError, match="resize every map"):
        metric.update(**(mixed_test_set(size=10)))
    with pytest.raises(DataError, match="one category name per image"):
        metric.update(**(batch | {"categories": ["bottle"]}))


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        batch = mixed_test_set()
        rows = slice(0, 5) if rank == 0 else slice(5, None)  # uneven shards
        metric = AnomalyMetrics()
        metric.update(**take(batch, rows))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricUndefinedWarning)
            result = metric.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result, sort_keys=True))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metric_gathers_states_across_ddp_ranks(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = AnomalyMetrics()
    single.update(**mixed_test_set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        expected = json.dumps(single.compute(), sort_keys=True)
    assert (tmp_path / "rank0.json").read_text() == expected
    assert (tmp_path / "rank1.json").read_text() == expected
