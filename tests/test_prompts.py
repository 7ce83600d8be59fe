"""Test prompts: seeded random draws, the first images, K prompts averaged, retrieval without the label."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from conftest import tiny_overrides

from onenip_pl.config import compose
from onenip_pl.data.datasets import PromptedImageDataset, normal_train_index
from onenip_pl.data.image_io import load_image
from onenip_pl.data.prompts import PromptBank, global_descriptor, retrieve_prompts, thumbnail_descriptor
from onenip_pl.errors import ConfigError, DataError


def _config(root: Path, output_dir: Path, *extra: str):
    return compose("train", tiny_overrides(root, output_dir, "logger=none", *extra))


def _datamodule(cfg, **overrides):
    datamodule = hydra.utils.instantiate(cfg.data, **overrides)
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="module")
def tiny_model(tiny_demo_root: Path, tmp_path_factory):
    """An untrained tiny OneNIP module (prompts matter to it as much as to a trained one)."""
    L.seed_everything(0)
    cfg = _config(tiny_demo_root, tmp_path_factory.mktemp("model"))
    return hydra.utils.instantiate(cfg.model).eval()


def _test(model, cfg, **data_overrides) -> dict:
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[])
    trainer.test(model, datamodule=hydra.utils.instantiate(cfg.data, **data_overrides))
    return model.test_results


def _dataset(datamodule, seed: int, mode: str = "random", k: int = 1) -> PromptedImageDataset:
    return PromptedImageDataset(datamodule.test_records, datamodule.train_source, 64, seed, mode, k)


def test_random_prompts_depend_on_the_seed_only(tiny_demo_root: Path, tmp_path: Path) -> None:
    datamodule = _datamodule(_config(tiny_demo_root, tmp_path))
    pool = normal_train_index(datamodule.train_source.records)
    first = _dataset(datamodule, seed=1).prompt_indices
    assert _dataset(datamodule, seed=1).prompt_indices == first
    assert _dataset(datamodule, seed=2).prompt_indices != first
    for record, prompts in zip(datamodule.test_records, first, strict=True):
        assert prompts[0] in pool[record.category]


def test_first_and_k_prompts_come_from_the_category(tiny_demo_root: Path, tmp_path: Path) -> None:
    datamodule = _datamodule(_config(tiny_demo_root, tmp_path))
    pool = normal_train_index(datamodule.train_source.records)
    first = _dataset(datamodule, seed=1, mode="first", k=2)
    assert first.prompt_indices == [pool[r.category][:2] for r in datamodule.test_records]
    drawn = _dataset(datamodule, seed=1, k=3)
    for record, prompts in zip(datamodule.test_records, drawn.prompt_indices, strict=True):
        assert len(set(prompts)) == 3 and set(prompts) <= set(pool[record.category])
    assert drawn[0]["prompt"].shape == (3, 3, 64, 64)
    assert _dataset(datamodule, seed=1)[0]["prompt"].shape == (3, 64, 64)
    with pytest.raises(DataError, match="test_prompt_k=7"):
        _dataset(datamodule, seed=1, k=7)
    with pytest.raises(ConfigError, match="test_prompt='closest'"):
        _dataset(datamodule, seed=1, mode="closest")


def test_same_seed_same_numbers_other_seed_other_numbers(
    tiny_model, tiny_demo_root: Path, tmp_path: Path
) -> None:
    cfg = _config(tiny_demo_root, tmp_path)
    first = _test(tiny_model, cfg, seed=5)
    assert _test(tiny_model, cfg, seed=5) == first
    other = _test(tiny_model, cfg, seed=6)
    assert other["mean"]["pixel_AUROC"] != first["mean"]["pixel_AUROC"]


def test_k_prompt_maps_are_the_mean_of_the_single_prompt_maps(
    tiny_model, tiny_demo_root: Path, tmp_path: Path
) -> None:
    datamodule = _datamodule(_config(tiny_demo_root, tmp_path), test_prompt_k=3)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["prompt"].shape[:2] == (batch["image"].shape[0], 3)
    rec_map, refiner_map, retrieved = tiny_model.prompted_maps(batch)
    assert retrieved is None
    singles = [tiny_model.net(batch["image"], batch["prompt"][:, k]) for k in range(3)]
    torch.testing.assert_close(rec_map, torch.stack([s["rec_map"] for s in singles]).mean(0))
    torch.testing.assert_close(refiner_map, torch.stack([s["refiner_map"] for s in singles]).mean(0))
    assert not torch.allclose(singles[0]["rec_map"], singles[1]["rec_map"]), "prompts should differ"


def test_global_descriptor_is_a_unit_vector_blind_to_position() -> None:
    features = torch.randn(2, 8, 4, 4)
    descriptor = global_descriptor(features)
    assert descriptor.shape == (2, 8)
    torch.testing.assert_close(descriptor.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(global_descriptor(features.roll(shifts=(1, 2), dims=(2, 3))), descriptor)


def test_retrieve_prompts_picks_the_nearest_category_then_its_k_nearest_images() -> None:
    bank = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.2, 0.9, 0.1], [0.0, 0.8, 0.6]]),
        dim=1,
    )
    categories = ["a", "a", "b", "b", "b"]
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 1.2, 0.1], [1.0, 0.05, 0.0]]), dim=1)
    # cosine similarities of query 0 to rows 0..4: 0.64, 0.72, 0.77, 0.89, 0.65
    indices, retrieved = retrieve_prompts(query, bank, categories)
    assert indices.tolist() == [[3], [0]] and retrieved == ["b", "a"]
    indices, retrieved = retrieve_prompts(query[:1], bank, categories, k=3)
    assert indices.tolist() == [[3, 2, 4]], "row 1 is nearer than row 4 but of another category"
    exclude = torch.zeros(2, 5, dtype=torch.bool)
    exclude[0, 3] = True
    indices, retrieved = retrieve_prompts(query, bank, categories, exclude=exclude)
    assert indices.tolist() == [[2], [0]] and retrieved == ["b", "a"]
    with pytest.raises(ConfigError, match="test_prompt_k=3.*'a'"):
        retrieve_prompts(query, bank, categories, k=3)


def test_retrieval_finds_prompts_without_the_label_and_reports_its_accuracy(
    tiny_model, tiny_demo_root: Path, tmp_path: Path
) -> None:
    cfg = _config(
        tiny_demo_root, tmp_path, "data.test_prompt=retrieval", "data.retrieval_images_per_category=2"
    )
    datamodule = _datamodule(cfg)
    batch = next(iter(datamodule.test_dataloader()))
    assert "prompt" not in batch
    relabelled = {**batch, "category": ["?"] * len(batch["category"])}
    maps = tiny_model.prompted_maps(batch)
    torch.testing.assert_close(tiny_model.prompted_maps(relabelled)[:2], maps[:2])

    results = _test(tiny_model, cfg)
    # the same measurement written out: nearest bank image by mean-pooled, normalised features
    bank_loader = datamodule.retrieval_bank_dataloader()
    assert len(bank_loader.dataset) == 2 * len(datamodule.category_names)
    with torch.no_grad():
        bank = PromptBank.build(tiny_model.net.extract_features, bank_loader, "cpu")
        hits: dict[str, list[bool]] = {}
        for test_batch in datamodule.test_dataloader():
            query = global_descriptor(tiny_model.net.extract_features(test_batch["image"]))
            nearest = (query @ bank.descriptors.T).argmax(dim=1)
            for category, row in zip(test_batch["category"], nearest.tolist(), strict=True):
                hits.setdefault(category, []).append(bank.categories[row] == category)
    assert sorted(results["per_category"]) == sorted(hits)
    for category, values in results["per_category"].items():
        assert values["retrieval_accuracy"] == pytest.approx(sum(hits[category]) / len(hits[category]))
    accuracy = results["mean"]["retrieval_accuracy"]
    print(f"retrieval accuracy on the tiny demo tree (untrained tiny backbone): {accuracy:.3f}")
    assert accuracy > 1 / len(hits), "retrieval should beat a random guess of the category"


def test_retrieval_calibration_never_uses_the_image_as_its_own_prompt(
    tiny_model, tiny_demo_root: Path, tmp_path: Path
) -> None:
    cfg = _config(
        tiny_demo_root, tmp_path, "data.test_prompt=retrieval", "data.retrieval_images_per_category=null"
    )
    datamodule = _datamodule(cfg)
    bank = PromptBank.build(tiny_model.net.extract_features, datamodule.retrieval_bank_dataloader(), "cpu")
    # every normal training image, so that bank images are among the calibration images
    batch = next(iter(datamodule.calibration_dataloader(all_normals=True)))
    in_bank = [i for i, path in enumerate(batch["path"]) if path in bank.paths]
    assert in_bank, "the batch must hold images that are retrieval candidates"
    batch = {
        key: batch[key][in_bank] if key == "image" else [batch[key][i] for i in in_bank]
        for key in ("image", "path")
    }
    query = tiny_model.net.extract_features(batch["image"])
    own_rows = [bank.paths.index(path) for path in batch["path"]]
    indices, _ = retrieve_prompts(global_descriptor(query), bank.descriptors, bank.categories)
    assert indices[:, 0].tolist() == own_rows, "without exclusion an image retrieves itself"
    exclude = bank.same_image(batch["path"])
    indices, _ = retrieve_prompts(
        global_descriptor(query), bank.descriptors, bank.categories, exclude=exclude
    )
    assert all(row != own for row, own in zip(indices[:, 0].tolist(), own_rows, strict=True))


def test_nearest_prompts_are_the_most_alike_thumbnails_of_the_category(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    datamodule = _datamodule(_config(tiny_demo_root, tmp_path))
    source = datamodule.train_source
    thumbnails = source.thumbnails()
    dataset = _dataset(datamodule, seed=1, mode="nearest", k=2)
    pool = normal_train_index(source.records)
    for record, prompts in zip(dataset.records, dataset.prompt_indices, strict=True):
        query = thumbnail_descriptor(load_image(record.path, 64))
        candidates = pool[record.category]
        ranked = sorted(candidates, key=lambda i: -float(thumbnails[i] @ query))
        assert prompts == ranked[:2]
    assert dataset.prompt_setting == "nearest, k=2"


def test_training_prompts_by_nearest_are_drawn_among_the_closest_others(tiny_demo_root: Path) -> None:
    from onenip_pl.data.datasets import NEAREST_CANDIDATES, ImageSource, TrainTripletDataset
    from onenip_pl.data.readers import read_dataset
    from onenip_pl.data.synthesis import AnomalySynthesizer

    records = [r for r in read_dataset("mvtec", tiny_demo_root) if r.split == "train"]
    source = ImageSource(records, 64)
    dataset = TrainTripletDataset(source, AnomalySynthesizer(64), seed=0, prompt_choice="nearest")
    thumbnails = source.thumbnails()
    pool = normal_train_index(records)
    for position, index in enumerate(dataset.indices):
        category = records[index].category
        others = sorted(
            (i for i in pool[category] if i != index), key=lambda i: -float(thumbnails[i] @ thumbnails[index])
        )
        sample = dataset[(position, 0, position)]
        assert sample["prompt_index"] in others[:NEAREST_CANDIDATES], "a near pose, never the query itself"
    with pytest.raises(ConfigError, match="data.train_prompt='best'"):
        TrainTripletDataset(source, AnomalySynthesizer(64), seed=0, prompt_choice="best")
