"""The data check: counts beside the official ones, and every kind of broken tree reported at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dataset_trees import make_btad_tree, make_mvtec_tree, make_visa_tree, truncate_file, write_image
from PIL import Image
from rich.console import Console

from onenip_pl.check import main
from onenip_pl.data.check import check_dataset, check_dtd, check_records, inspect_file
from onenip_pl.data.official_counts import (
    BENCHMARK_CATEGORIES,
    BENCHMARK_TOTALS,
    BTAD_PER_CATEGORY,
    MVTEC_PER_CATEGORY,
    SplitCounts,
)
from onenip_pl.data.readers import read_dataset
from onenip_pl.data.records import ImageRecord
from onenip_pl.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def render(report) -> str:
    console = Console(record=True, width=160)
    console.print(report.table())
    return console.export_text()


def test_official_per_category_counts_add_up_to_the_published_totals():
    assert (
        sum(MVTEC_PER_CATEGORY.values(), SplitCounts())
        == BENCHMARK_TOTALS["mvtec"]
        == SplitCounts(3629, 467, 1258)
    )
    assert sum(BTAD_PER_CATEGORY.values(), SplitCounts()) == BENCHMARK_TOTALS["btad"]
    assert BENCHMARK_TOTALS["btad"].train == 1799 and BENCHMARK_TOTALS["btad"].test == 741
    assert BENCHMARK_TOTALS["mvtec"].test == 1725
    assert BENCHMARK_TOTALS["visa"] == SplitCounts(8659, 962, 1200)
    assert sum(len(names) for names in BENCHMARK_CATEGORIES.values()) == 30


def test_clean_tree_passes_and_counts_sit_beside_the_official_ones(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle", "grid"))
    report = check_dataset("mvtec", tmp_path)
    assert report.ok and report.problems == []
    assert len(report.records) == 2 * (3 + 2 + 3)
    rows = {row.name: row for row in report.rows}
    assert rows["bottle"].found == SplitCounts(3, 2, 3)
    assert rows["bottle"].official == SplitCounts(209, 20, 63)
    assert rows["MVTec AD total (2/15 categories)"].official is None
    assert any("bottle: found 3 / 2 / 3" in note and "209 / 20 / 63" in note for note in report.notes)
    table = render(report)
    assert "3 / 209" in table and "differs" in table
    assert report.files_checked == 2 * (3 + 2 + 3) + 2 * 3


def test_strict_counts_turn_a_count_mismatch_into_a_problem(tmp_path):
    make_btad_tree(tmp_path, ("01",))
    with pytest.raises(DataError, match=r"01: found 3 / 2 / 2 .* official release has 400 / 21 / 49"):
        check_dataset("btad", tmp_path, strict_counts=True)


def test_visa_total_is_compared_only_when_all_objects_are_present(tmp_path):
    make_visa_tree(tmp_path, ("candle",))
    report = check_dataset("visa", tmp_path)
    rows = {row.name: row for row in report.rows}
    assert rows["candle"].official is None
    assert rows["VisA total (1/12 categories)"].found == SplitCounts(4, 2, 2)
    assert rows["VisA total (1/12 categories)"].official is None


def test_truncated_images_are_caught_by_verify_and_full_but_not_by_headers(tmp_path):
    make_visa_tree(tmp_path, ("candle",), size=(64, 96))
    make_mvtec_tree(tmp_path / "mvtec", ("bottle",), size=(64, 96))
    jpeg = truncate_file(tmp_path / "candle" / "Data" / "Images" / "Normal" / "0001.JPG", keep=0.6)
    png = truncate_file(tmp_path / "mvtec" / "bottle" / "train" / "good" / "001.png", keep=0.6)
    for path in (jpeg, png):
        assert inspect_file(path, "header").error is None
        assert str(path) in inspect_file(path, "verify").error
        assert str(path) in inspect_file(path, "full").error
    with pytest.raises(DataError, match=r"cannot read .*0001.JPG"):
        check_dataset("visa", tmp_path)
    assert check_dataset("visa", tmp_path, decode=False).ok


def test_every_problem_is_listed_in_one_error(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle", "cable"))
    bottle = tmp_path / "bottle"
    truncate_file(bottle / "train" / "good" / "000.png", keep=0.3)
    (bottle / "test" / "good" / "001.png").write_text("not an image")
    write_image(bottle / "ground_truth" / "broken" / "000_mask.png", np.random.default_rng(0), size=(32, 24))
    records = read_dataset("mvtec", tmp_path)
    records += [
        ImageRecord(bottle / "test" / "crack" / "000.png", "bottle", "test", 1, None, "crack"),
        ImageRecord(bottle / "test" / "good" / "000.png", "bottle", "train", 1, None, "good"),
    ]
    with pytest.raises(DataError) as caught:
        check_records(records, "mvtec")
    message = str(caught.value)
    assert message.startswith("7 problem(s) in data set mvtec")
    assert f"cannot read {bottle / 'train' / 'good' / '000.png'}" in message
    assert f"cannot read {bottle / 'test' / 'good' / '001.png'}" in message
    assert f"mask {bottle / 'ground_truth' / 'broken' / '000_mask.png'} is 24x32 (WxH)" in message
    assert "is 32x24" in message
    assert f"defective test image {bottle / 'test' / 'crack' / '000.png'} has no mask" in message
    assert "is labelled anomalous" in message
    assert f"image {bottle / 'test' / 'crack' / '000.png'} is listed 2 times" in message
    assert f"image {bottle / 'test' / 'good' / '000.png'} is listed 2 times" in message


def test_category_without_training_images_or_without_test_images(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle", "cable"))
    records = read_dataset("mvtec", tmp_path)
    test_only = [r for r in records if not (r.category == "bottle" and r.split == "train")]
    with pytest.raises(DataError, match="category 'bottle' has no training images"):
        check_records(test_only, "mvtec")
    train_only = [r for r in records if not (r.category == "cable" and r.split == "test")]
    with pytest.raises(DataError, match="category 'cable' has training images only"):
        check_records(train_only, "mvtec")
    report = check_records(train_only, "folder")
    assert report.ok
    assert any(
        "'cable' has training images only" in note and "not evaluated" in note for note in report.notes
    )


def test_no_records_at_all_is_a_problem():
    with pytest.raises(DataError, match="no images at all"):
        check_records([], "folder")


def test_full_decode_reports_each_file_size_and_accepts_a_clean_tree(tmp_path):
    make_btad_tree(tmp_path)
    report = check_dataset("btad", tmp_path, decode="full")
    assert report.ok and report.decode == "full"
    record = next(r for r in report.records if r.mask_path is not None and r.category == "03")
    assert inspect_file(record.mask_path, "full", is_mask=True).size == (24, 32)


def test_masks_larger_than_one_byte_per_pixel_still_compare_sizes(tmp_path):
    make_mvtec_tree(tmp_path, ("bottle",))
    mask = tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    Image.fromarray(np.full((24, 33), 65535, dtype=np.uint16)).save(mask)
    with pytest.raises(DataError, match="is 33x24"):
        check_dataset("mvtec", tmp_path)


@pytest.mark.skipif(
    not (SHARED_DATA / "dtd_mini").is_dir(), reason=f"shared DTD subset not found in {SHARED_DATA}"
)
def test_dtd_subset_checks_clean_and_notes_it_is_a_subset():
    report = check_dtd(SHARED_DATA / "dtd_mini")
    assert (report.classes, report.images) == (4, 40)
    assert report.problems == []
    assert "the DTD release has 47 and 5640" in report.notes[0]


def test_dtd_problems_and_missing_root(tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "images" / "banded" / "banded_0001.jpg", rng, size=(64, 64))
    truncate_file(
        write_image(tmp_path / "images" / "banded" / "banded_0002.jpg", rng, size=(64, 64)), keep=0.4
    )
    (tmp_path / "images" / "README").write_text("x")
    with pytest.raises(DataError) as caught:
        check_dtd(tmp_path)
    assert "banded_0002.jpg" in str(caught.value) and "README" in str(caught.value)
    with pytest.raises(DataError, match="prepare_data.py dtd --root"):
        check_dtd(tmp_path / "nothing")


def test_cli_composes_the_config_and_prints_counts(tmp_path, capsys):
    make_mvtec_tree(tmp_path, ("bottle",))
    assert main(["data.dataset=mvtec", f"data.root={tmp_path}"]) == 0
    output = capsys.readouterr().out
    assert "bottle" in output and "3 / 209" in output and "OK" in output
    (tmp_path / "bottle" / "test" / "good" / "000.png").write_bytes(b"garbage")
    assert main(["data.dataset=mvtec", f"data.root={tmp_path}", "data.categories=[bottle]"]) == 1
    assert "000.png" in capsys.readouterr().out


def test_cli_runs_as_a_module_and_exits_non_zero_on_a_missing_root(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "onenip_pl.check",
            "data.dataset=btad",
            f"data.root={tmp_path / 'absent'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    assert result.returncode == 1
    assert "prepare_data.py btad" in result.stdout
