"""Readers against tiny trees laid out like each release, and against the real hazelnut_toy set."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dataset_trees import (
    BTAD_EXTENSIONS,
    make_btad_tree,
    make_folder_tree,
    make_mvtec_tree,
    make_union_trees,
    make_visa_tree,
    write_image,
    write_mask,
)
from omegaconf import OmegaConf
from PIL import Image

from onenip_pl.data.image_io import read_mask, read_rgb
from onenip_pl.data.official_counts import (
    BTAD_CATEGORIES,
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    SplitCounts,
)
from onenip_pl.data.readers import READERS, read_dataset
from onenip_pl.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAZELNUT_TOY = SHARED_DATA / "hazelnut_toy"


def counts_of(records) -> dict[str, SplitCounts]:
    tally = Counter((r.category, r.split, r.label) for r in records)
    return {
        category: SplitCounts(
            tally[category, "train", 0], tally[category, "test", 0], tally[category, "test", 1]
        )
        for category in {r.category for r in records}
    }


# ---------------------------------------------------------------- MVTec AD


def test_mvtec_reads_counts_labels_and_defect_types(tmp_path):
    expected = make_mvtec_tree(tmp_path, ("bottle", "grid"), defects={"broken_large": 2, "contamination": 1})
    records = read_dataset("mvtec", tmp_path)
    assert counts_of(records) == expected
    assert {r.defect_type for r in records if r.label == 1} == {"broken_large", "contamination"}
    assert {r.defect_type for r in records if r.label == 0} == {"good"}
    assert not [r for r in records if r.split == "train" and r.label == 1]


def test_mvtec_pairs_each_defect_with_its_stem_mask(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle",))
    records = read_dataset("mvtec", tmp_path)
    anomalous = [r for r in records if r.label == 1]
    assert anomalous
    for record in anomalous:
        assert record.mask_path == tmp_path / "bottle" / "ground_truth" / record.defect_type / (
            record.path.stem + "_mask.png"
        )
        assert record.path.parent.name == record.defect_type
    assert all(r.mask_path is None for r in records if r.label == 0)


def test_mvtec_grayscale_categories_are_single_channel_on_disk_and_rgb_when_read(tmp_path):
    make_mvtec_tree(tmp_path, ("grid", "screw", "zipper", "bottle"))
    records = read_dataset("mvtec", tmp_path)
    for category, mode in (("grid", "L"), ("screw", "L"), ("zipper", "L"), ("bottle", "RGB")):
        record = next(r for r in records if r.category == category)
        assert Image.open(record.path).mode == mode
        assert read_rgb(record.path).shape == (24, 32, 3)


def test_mvtec_categories_restrict_the_read_and_unknown_ones_are_named(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle", "cable", "grid"))
    assert {r.category for r in read_dataset("mvtec", tmp_path, ["cable", "grid"])} == {"cable", "grid"}
    assert {r.category for r in read_dataset("mvtec", tmp_path, "cable")} == {"cable"}
    with pytest.raises(DataError, match=r"\['pill'\] not found.*available: \['bottle', 'cable', 'grid'\]"):
        read_dataset("mvtec", tmp_path, ["bottle", "pill"])


def test_missing_root_says_where_and_how_to_get_the_data(tmp_path):
    missing = tmp_path / "nowhere"
    for name in ("mvtec", "visa", "btad"):
        with pytest.raises(DataError) as caught:
            read_dataset(name, missing)
        message = str(caught.value)
        assert str(missing) in message
        assert f"python scripts/prepare_data.py {name} --root {missing}" in message
    with pytest.raises(DataError, match="expected at"):
        read_dataset("folder", missing)


def test_mvtec_defective_image_without_mask_is_named(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle",))
    (tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DataError) as caught:
        read_dataset("mvtec", tmp_path)
    assert f"defective image {tmp_path / 'bottle' / 'test' / 'crack' / '000.png'} has no mask" in str(
        caught.value
    )


def test_mvtec_insists_on_the_mask_suffix_where_the_folder_reader_does_not(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle",), defects={"crack": 1})
    gt = tmp_path / "bottle" / "ground_truth" / "crack"
    (gt / "000_mask.png").rename(gt / "000.png")
    with pytest.raises(DataError, match=r"000.png has no mask: expected 000_mask.png"):
        read_dataset("mvtec", tmp_path)
    assert [r.mask_path for r in read_dataset("folder", tmp_path) if r.label] == [gt / "000.png"]


def test_mvtec_reports_every_structural_problem_at_once(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle", "grid"))
    base = tmp_path / "bottle"
    (base / "ground_truth" / "broken" / "001_mask.png").unlink()
    (base / "train" / "good" / "notes.txt").write_text("x")
    write_mask(base / "ground_truth" / "crack" / "007_mask.png", np.random.default_rng(0))
    write_image(base / "train" / "bad" / "000.png", np.random.default_rng(0))
    shutil.rmtree(tmp_path / "grid" / "ground_truth" / "crack")
    with pytest.raises(DataError) as caught:
        read_dataset("mvtec", tmp_path)
    message = str(caught.value)
    assert message.startswith("3 problem(s)"), "a stray note and an unknown folder are passed over"
    assert "test/broken/001.png has no mask" in message
    assert "007_mask.png belongs to no image" in message
    assert f"no mask directory {tmp_path / 'grid' / 'ground_truth' / 'crack'}" in message
    with pytest.raises(DataError) as caught:
        read_dataset("mvtec", tmp_path, strict=True)
    message = str(caught.value)
    assert f"file {base / 'train' / 'good' / 'notes.txt'} is not an image (data.strict=true)" in message
    assert f"directory {base / 'train' / 'bad'} is not part of the layout (data.strict=true)" in message
    assert "test/broken/001.png has no mask" in message


def test_release_extras_are_passed_over_and_listed_and_strict_stops_on_them(tmp_path, caplog):
    """MVTec AD ships license.txt and readme.txt in every category, MVTec 3D-AD a validation/ split."""
    expected = make_mvtec_tree(tmp_path, ("bottle", "grid"))
    with caplog.at_level(logging.INFO):
        records = read_dataset("mvtec", tmp_path)
    assert counts_of(records) == expected
    for category in ("bottle", "grid"):
        assert {tmp_path / category / name for name in ("license.txt", "readme.txt")} <= set(
            records.passed_over_files
        )
        assert tmp_path / category / "validation" in records.passed_over_dirs
    assert tmp_path / "license.txt" in records.passed_over_files, "the release root's own files too"
    info = [r for r in caplog.records if "that are not images" in r.getMessage()]
    warning = [r for r in caplog.records if "directory(ies) the layout does not know" in r.getMessage()]
    assert len(info) == 1 and info[0].levelno == logging.INFO and "readme.txt" in info[0].getMessage()
    assert len(warning) == 1 and warning[0].levelno == logging.WARNING
    assert str(tmp_path / "grid" / "validation") in warning[0].getMessage()
    with pytest.raises(DataError) as caught:
        read_dataset("mvtec", tmp_path, strict=True)
    message = str(caught.value)
    assert f"file {tmp_path / 'bottle' / 'license.txt'} is not an image" in message
    assert f"directory {tmp_path / 'grid' / 'validation'} is not part of the layout" in message


def test_an_image_outside_the_layout_is_an_error_not_passed_over(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle",))
    write_image(tmp_path / "bottle" / "stray.png", np.random.default_rng(0))
    write_image(tmp_path / "bottle" / "test" / "loose.png", np.random.default_rng(1))
    with pytest.raises(DataError) as caught:
        read_dataset("mvtec", tmp_path)
    message = str(caught.value)
    assert f"image {tmp_path / 'bottle' / 'stray.png'} lies outside the layout" in message
    assert f"image {tmp_path / 'bottle' / 'test' / 'loose.png'} lies directly in test/" in message


def test_hidden_files_are_passed_over_and_extensions_are_case_insensitive(tmp_path):
    expected = make_mvtec_tree(tmp_path, ("bottle",))
    (tmp_path / "bottle" / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "bottle" / "train" / "good" / "000.png").rename(
        tmp_path / "bottle" / "train" / "good" / "000.PNG"
    )
    records = read_dataset("mvtec", tmp_path)
    assert counts_of(records) == expected
    assert tmp_path / "bottle" / "train" / "good" / "000.PNG" in {r.path for r in records}


def test_mvtec_root_one_level_too_high_suggests_the_right_one(tmp_path):
    make_mvtec_tree(tmp_path / "mvtec_anomaly_detection", ("bottle",))
    with pytest.raises(DataError, match="data.root may be .*mvtec_anomaly_detection"):
        read_dataset("mvtec", tmp_path)


def test_mvtec_category_without_any_image_is_an_error(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle",))
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        read_dataset("mvtec", tmp_path)


# ---------------------------------------------------------------- VisA


def test_visa_reads_the_split_csv(tmp_path):
    expected = make_visa_tree(tmp_path, ("candle", "pcb1"), n_train=4, n_test_normal=2, n_anomaly=3)
    records = read_dataset("visa", tmp_path)
    assert counts_of(records) == expected
    assert all(r.path.suffix == ".JPG" and r.path.is_file() for r in records)
    assert all(r.path.parent.name == "Normal" for r in records if r.label == 0)
    anomalous = [r for r in records if r.label == 1]
    assert all(r.split == "test" and r.defect_type == "anomaly" for r in anomalous)
    for record in anomalous:
        assert record.mask_path == tmp_path / record.category / "Data" / "Masks" / "Anomaly" / (
            record.path.stem + ".png"
        )


def test_visa_masks_with_defect_ids_binarise_to_every_nonzero_pixel(tmp_path):
    make_visa_tree(tmp_path, ("candle",), n_anomaly=3)
    masks = [r.mask_path for r in read_dataset("visa", tmp_path) if r.label == 1]
    for mask_path in masks:
        raw = np.asarray(Image.open(mask_path))
        assert raw.max() <= 3 and raw.max() > 0
        assert np.array_equal(read_mask(mask_path), raw > 0)
    assert {int(np.asarray(Image.open(m)).max()) for m in masks} == {1, 2, 3}


def test_visa_objects_restrict_and_unknown_objects_are_named(tmp_path):
    make_visa_tree(tmp_path, ("candle", "pcb1", "fryum"))
    assert {r.category for r in read_dataset("visa", tmp_path, ["pcb1"])} == {"pcb1"}
    with pytest.raises(DataError, match=r"objects \['pcb9'\] are not in"):
        read_dataset("visa", tmp_path, ["pcb9"])


def test_visa_without_split_csv_explains_the_expected_layout(tmp_path):
    make_visa_tree(tmp_path, ("candle",))
    (tmp_path / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match=r"split_csv/1cls.csv not found.*prepare_data.py visa"):
        read_dataset("visa", tmp_path)


def test_visa_csv_with_wrong_columns_is_rejected(tmp_path):
    make_visa_tree(tmp_path, ("candle",))
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,split,image\ncandle,train,x.JPG\n")
    with pytest.raises(DataError, match=r"lacks the columns \['label', 'mask'\]"):
        read_dataset("visa", tmp_path)


def test_visa_bad_rows_are_all_reported_with_line_numbers(tmp_path):
    make_visa_tree(tmp_path, ("candle",), n_train=2, n_test_normal=1, n_anomaly=2)
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    lines[1] = lines[1].replace(",train,", ",training,")
    lines[4] = lines[4].rsplit(",", 1)[0] + ","
    lines.append("candle,train,normal,candle/Data/Images/Normal/9999.JPG,")
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        read_dataset("visa", tmp_path)
    message = str(caught.value)
    assert "1cls.csv line 2: split 'training'" in message
    assert "1cls.csv line 5: anomalous image" in message and "has no mask" in message
    assert "1cls.csv line 7: image" in message and "9999.JPG does not exist" in message


# ---------------------------------------------------------------- BTAD


def test_btad_reads_each_product_with_its_own_extensions(tmp_path):
    expected = make_btad_tree(tmp_path, n_train=3, n_test_ok=2, n_test_ko=2)
    records = read_dataset("btad", tmp_path)
    assert counts_of(records) == expected
    for product, (image_ext, mask_ext) in BTAD_EXTENSIONS.items():
        mine = [r for r in records if r.category == product]
        assert {r.path.suffix for r in mine} == {image_ext}
        for record in (r for r in mine if r.label == 1):
            assert record.defect_type == "ko"
            assert (
                record.mask_path
                == tmp_path / product / "ground_truth" / "ko" / f"{record.path.stem}{mask_ext}"
            )


def test_btad_defect_without_mask_is_named(tmp_path):
    make_btad_tree(tmp_path, ("03",))
    (tmp_path / "03" / "ground_truth" / "ko" / "0001.bmp").unlink()
    with pytest.raises(DataError, match=r"03/test/ko/0001.bmp has no mask"):
        read_dataset("btad", tmp_path)


def test_btad_root_above_the_archive_folder_is_pointed_out(tmp_path):
    make_btad_tree(tmp_path / "BTech_Dataset_transformed", ("01",))
    with pytest.raises(DataError, match="data.root=.*BTech_Dataset_transformed"):
        read_dataset("btad", tmp_path)


# ---------------------------------------------------------------- MVTec + VisA + BTAD


def test_union_reads_all_30_official_categories(tmp_path):
    roots, expected = make_union_trees(tmp_path)
    records = read_dataset("mvtec_visa_btad", OmegaConf.create({k: str(v) for k, v in roots.items()}))
    assert len(expected) == 30
    assert counts_of(records) == expected
    categories = {r.category for r in records}
    assert categories == set(MVTEC_CATEGORIES) | set(VISA_CATEGORIES) | set(BTAD_CATEGORIES)
    visa_paths = [r.path for r in records if r.category in VISA_CATEGORIES]
    assert all(path.is_relative_to(roots["visa"]) for path in visa_paths)


def test_union_routes_requested_categories_to_their_release(tmp_path):
    roots, _ = make_union_trees(tmp_path)
    records = read_dataset("mvtec_visa_btad", roots, ["bottle", "pcb4", "02"])
    assert {r.category for r in records} == {"bottle", "pcb4", "02"}
    with pytest.raises(ConfigError, match=r"\['teapot'\] are in none"):
        read_dataset("mvtec_visa_btad", roots, ["bottle", "teapot"])


def test_union_root_must_map_the_three_parts(tmp_path):
    roots, _ = make_union_trees(tmp_path)
    with pytest.raises(ConfigError, match="must map each part"):
        read_dataset("mvtec_visa_btad", tmp_path)
    with pytest.raises(ConfigError, match=r"missing or empty: \['btad'\], unknown: \['mpdd'\]"):
        read_dataset("mvtec_visa_btad", {"mvtec": roots["mvtec"], "visa": roots["visa"], "mpdd": tmp_path})


def test_union_rejects_a_category_name_found_in_two_releases(tmp_path):
    roots, _ = make_union_trees(tmp_path)
    make_mvtec_tree(roots["mvtec"], ("candle",), size=(12, 16))
    with pytest.raises(DataError, match=r"\{'candle': \['mvtec', 'visa'\]\}"):
        read_dataset("mvtec_visa_btad", roots)


# ---------------------------------------------------------------- folder


def test_folder_reads_mixed_extensions_flat_train_and_both_mask_namings(tmp_path):
    expected = make_folder_tree(tmp_path)
    records = read_dataset("folder", tmp_path)
    assert counts_of(records) == expected
    masks = {r.path.name: r.mask_path.name for r in records if r.label == 1}
    assert masks == {"s1.png": "s1.png", "s2.JPG": "s2.png", "s3.bmp": "s3_mask.BMP"}
    assert {r.path.suffix for r in records if r.category == "widget" and r.split == "train"} == {
        ".PNG",
        ".JpEg",
        ".tif",
        ".jpg",
    }


def test_folder_mask_dir_and_normal_dir_can_be_renamed(tmp_path):
    make_folder_tree(tmp_path)
    widget = tmp_path / "widget"
    (widget / "ground_truth").rename(widget / "masks")
    (widget / "test" / "good").rename(widget / "test" / "ok")
    (widget / "train" / "good").rename(widget / "train" / "ok")
    records = read_dataset("folder", tmp_path, ["widget"], mask_dir="masks", normal_dir="ok")
    assert counts_of(records) == {"widget": SplitCounts(4, 1, 3)}
    with pytest.raises(DataError, match="no mask directory .*ground_truth/scratch"):
        read_dataset("folder", tmp_path, ["widget"])


def test_folder_ambiguous_and_missing_masks_are_errors_a_thumbs_db_is_passed_over(tmp_path):
    make_folder_tree(tmp_path)
    scratch_masks = tmp_path / "widget" / "ground_truth" / "scratch"
    write_mask(scratch_masks / "s1_mask.png", np.random.default_rng(1))
    (scratch_masks / "s2.png").unlink()
    thumbs = tmp_path / "gadget" / "train" / "Thumbs.db"
    thumbs.write_bytes(b"\0")
    with pytest.raises(DataError) as caught:
        read_dataset("folder", tmp_path)
    message = str(caught.value)
    assert "s1.png matches several masks" in message
    assert "s2.JPG has no mask: expected s2_mask.png or s2.png" in message
    assert "Thumbs.db" not in message
    with pytest.raises(DataError, match=f"file {thumbs} is not an image"):
        read_dataset("folder", tmp_path, strict=True)


# ---------------------------------------------------------------- registry


def test_registry_names_and_configuration_errors(tmp_path):
    assert set(READERS) == {"mvtec", "visa", "btad", "mvtec_visa_btad", "folder"}
    make_mvtec_tree(tmp_path, ("bottle",))
    with pytest.raises(ConfigError, match="data.dataset='mvtec_ad' is unknown"):
        read_dataset("mvtec_ad", tmp_path)
    with pytest.raises(ConfigError, match="data.root is not set"):
        read_dataset("mvtec", None)
    with pytest.raises(ConfigError, match="must be one directory"):
        read_dataset("mvtec", {"mvtec": tmp_path})
    with pytest.raises(ConfigError, match=r"options \['mask_dir'\] do not fit"):
        read_dataset("mvtec", tmp_path, mask_dir="masks")
    assert read_dataset("mvtec", tmp_path, []) == read_dataset("mvtec", tmp_path, None)


# ---------------------------------------------------------------- the real hazelnut_toy set


needs_hazelnut = pytest.mark.skipif(
    not HAZELNUT_TOY.is_dir(), reason=f"shared real data set not found at {HAZELNUT_TOY} (needs ../shared)"
)


@needs_hazelnut
@pytest.mark.parametrize("reader", ["mvtec", "folder"])
def test_hazelnut_toy_reads_through_mvtec_and_folder_readers(reader):
    records = read_dataset(reader, HAZELNUT_TOY)
    assert counts_of(records) == {"hazelnut_toy": SplitCounts(28, 6, 17)}
    anomalous = [r for r in records if r.label == 1]
    assert {r.defect_type for r in anomalous} == {"colour"}
    for record in anomalous:
        assert record.path.suffix == ".jpg"
        assert record.mask_path.name == f"{record.path.stem}_mask.png"
        assert read_mask(record.mask_path).any()


@needs_hazelnut
def test_hazelnut_toy_reads_identically_through_both_readers():
    assert read_dataset("mvtec", HAZELNUT_TOY) == read_dataset("folder", HAZELNUT_TOY)
