"""report.html: every test or predicted image as a row with its decision, checked in a real headless
Chromium (Debian's `chromium`; skipped, saying so, where it is not installed), and the same rows in W&B."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest
import torch
from conftest import REPO_ROOT, tiny_overrides
from PIL import Image
from sklearn.metrics import roc_auc_score
from wandb_records import logged_values

from onenip_pl.calibration.decision import decide
from onenip_pl.config import compose
from onenip_pl.eval import evaluate
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.predict import predict_files
from onenip_pl.review import ReviewRow, RunRows, outcome_counts, write_review_page
from onenip_pl.review.rows import decided_row
from onenip_pl.train import train

pytest_plugins = ["fixtures_checkpoint"]  # the shared tiny_checkpoint fixture

AWKWARD_NAMES = ['part "7" <a&b>', "with space ü", "Ωmega & co"]
SIZE = 224  # the demo's test resolution: pictures from batch views this large, thumbnails made smaller


# ---- the headless browser ------------------------------------------------------------------------


def chromium_binary() -> str:
    """The system Chromium, or skip the test saying how to get it (no browser is downloaded)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "Chromium is not installed (apt-get install -y chromium; .ci/run installs it): no browser check"
    )


def open_in_chromium(page: Path, fragment: str = "", screenshot: Path | None = None) -> tuple[str, str]:
    """(the DOM after the page's script ran, Chromium's log) for ``page#fragment``, or a screenshot."""
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    command = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",  # tests run as root in CI containers
        "--disable-gpu",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
    ]
    if screenshot is not None:
        command += ["--hide-scrollbars", "--window-size=1280,1100", f"--screenshot={screenshot}"]
    else:
        command.append("--dump-dom")
    result = subprocess.run([*command, url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def console_messages(log: str) -> list[str]:
    """What the page wrote to the console or threw (Chromium logs both as CONSOLE lines)."""
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


class PageRows(HTMLParser):
    """The drawn rows (their data- attributes), every link and image source, and elements by id."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.links: list[str] = []
        self.ids: dict[str, dict[str, str]] = {}
        self.texts: dict[str, str] = {}
        self._open_id: str | None = None
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "tr" and "row" in attributes.get("class", "").split():
            self.rows.append(attributes)
        if tag == "a" and attributes.get("href"):
            self.links.append(attributes["href"])
        if tag == "img" and attributes.get("src"):
            self.links.append(attributes["src"])
        if "id" in attributes:
            self.ids[attributes["id"]] = attributes
            self._open_id = attributes["id"]
            self.texts[self._open_id] = ""

    def handle_data(self, data: str) -> None:
        if self._open_id is not None:
            self.texts[self._open_id] += data

    def handle_endtag(self, tag: str) -> None:
        self._open_id = None


def check_page(page: Path, fragment: str = "size=100000") -> PageRows:
    """The page as drawn by Chromium: no console message, no script error, every local link resolving."""
    dom, log = open_in_chromium(page, fragment)
    assert console_messages(log) == []
    parsed = PageRows(dom)
    assert "hidden" in parsed.ids["script-errors"], parsed.texts.get("script-errors")
    base = page.resolve().as_uri()
    for link in parsed.links:
        target = urlparse(urljoin(base, link))
        if target.scheme == "file":
            assert Path(unquote(target.path)).is_file(), f"{link} does not lead to a file"
    return parsed


def embedded_rows(page: Path) -> list[dict]:
    text = page.read_text(encoding="utf-8")
    blob = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', text, re.DOTALL)
    return json.loads(blob.group(1))["rows"]


# ---- rows and page without a model ---------------------------------------------------------------


def _test_rows(tmp_path: Path, labels: list[int], scores: list[float], threshold: float) -> list[ReviewRow]:
    """Rows of a synthetic test batch through RunRows: real pictures of real files with awkward names."""
    generator = torch.Generator().manual_seed(0)
    count = len(labels)
    images = torch.randint(0, 256, (count, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    masks = torch.zeros(count, SIZE, SIZE, dtype=torch.bool)
    masks[torch.tensor(labels, dtype=torch.bool), 50:90, 60:120] = True
    paths = []
    for index, label in enumerate(labels):
        source = tmp_path / "data" / ("crack" if label else "good") / f"{AWKWARD_NAMES[index % 3]}.png"
        source.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(source)
        paths.append(str(source))
    rows = RunRows(tmp_path / "run")
    rows.add_test_batch(
        images,
        masks,
        labels,
        paths,
        ["cat"] * count,
        torch.rand(count, 1, SIZE, SIZE, generator=generator),
        torch.tensor(scores),
        lambda category: (threshold, 0.5),
    )
    return rows.rows


def test_decisions_follow_the_one_rule_and_count_outcomes(tmp_path: Path) -> None:
    rows = _test_rows(tmp_path, [0, 0, 1, 1, 0], [0.1, 0.5, 0.5, 0.2, 0.7], threshold=0.5)
    assert [row.decision for row in rows] == [False, True, True, False, True]  # 0.5 >= 0.5 is anomalous
    assert [row.outcome for row in rows] == ["TN", "FP", "TP", "FN", "FP"]
    assert outcome_counts(rows) == {"TP": 1, "FP": 2, "TN": 1, "FN": 1}
    assert [row.name for row in rows[:4]] == [
        'cat/good/part "7" <a&b>',
        "cat/good/with space ü",
        "cat/crack/Ωmega & co",
        'cat/crack/part "7" <a&b>',
    ]
    assert rows[4].name == "cat/good/with space ü~2"  # the same file name twice: its own pictures
    for row in rows:
        for picture in (row.thumbnail, row.overlay_thumbnail, row.overlay):
            assert Image.open(tmp_path / "run" / picture).format == "JPEG"
    assert Image.open(tmp_path / "run" / rows[0].thumbnail).size == (128, 128)
    assert Image.open(tmp_path / "run" / rows[0].overlay).size == (SIZE, SIZE)
    undecided = decided_row("x", "", "cat", 0.3, float("nan"))
    assert undecided.decision is None and undecided.outcome is None and undecided.image_threshold is None


def test_awkward_file_names_are_escaped_and_still_link_to_their_files(tmp_path: Path) -> None:
    rows = _test_rows(tmp_path, [0, 1, 1, 0], [0.2, 0.9, 0.1, 0.8], threshold=0.5)
    page = write_review_page(rows, tmp_path / "run", title="names <&>", labelled=True)
    text = page.read_text(encoding="utf-8")
    assert "<a&b>" not in text and "names &lt;&amp;&gt;" in text
    assert [row["n"] for row in embedded_rows(page)] == [row.name for row in rows]
    for row in embedded_rows(page):
        assert (tmp_path / "run" / unquote(row["ov"])).is_file()
        assert Path(unquote(urlparse(row["src"]).path)).is_file()

    drawn = check_page(page)  # also: every link and image of the drawn page leads to a file
    assert sorted(r["data-name"] for r in drawn.rows) == sorted(row.name for row in rows)
    assert len(drawn.links) >= 4 * len(rows)
    assert drawn.ids["total-FP"] and drawn.texts["total-FP"] == "1" and drawn.texts["total-FN"] == "1"


def test_a_test_without_defective_images_says_so(tmp_path: Path) -> None:
    rows = _test_rows(tmp_path, [0, 0, 0], [0.3, 0.3, 0.3], threshold=0.5)
    page = write_review_page(rows, tmp_path / "run", title="all normal", labelled=True)
    drawn = check_page(page)
    assert "no-defects" in drawn.ids
    assert "No defective images in cat" in page.read_text(encoding="utf-8")
    assert drawn.texts["total-TN"] == "3" and drawn.texts["total-defective"] == "0"
    assert len(drawn.rows) == 3


def test_ten_thousand_rows_draw_one_page_at_a_time(tmp_path: Path) -> None:
    rows = [
        decided_row(f"cat/good/{index:05d}", "", "cat", index / 10000, 0.5, label=int(index % 7 == 0))
        for index in range(10000)
    ]
    page = write_review_page(rows, tmp_path, title="many", labelled=True)
    first = check_page(page, "")
    assert len(first.rows) == 100
    assert first.rows[0]["data-name"] == "cat/good/09999"  # highest score first
    closest = check_page(page, "sort=distance&size=10&page=2")
    assert [r["data-name"] for r in closest.rows] == sorted(
        (row.name for row in rows), key=lambda name: (abs(int(name[-5:]) / 10000 - 0.5), int(name[-5:]))
    )[10:20]
    wrong = check_page(page, "correct=FN&size=10000")
    expected = [row.name for row in rows if row.outcome == "FN"]
    assert sorted(r["data-name"] for r in wrong.rows) == sorted(expected) and expected
    assert wrong.ids["shown"]["data-matching"] == str(len(expected))


# ---- a real test run and a real predict run ------------------------------------------------------


def _wandb_table(run: Path, key: str) -> dict:
    (path,) = (run / "files" / "media" / "table").rglob(f"{key}_*.table.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def demo_run(tiny_demo_root: Path, tmp_path_factory) -> Path:
    """A tiny train + test run on the demo data, logged to an offline W&B run."""
    output_dir = tmp_path_factory.mktemp("demo_run")
    overrides = tiny_overrides(tiny_demo_root, output_dir, "logger=wandb", "callbacks.report.curves=true")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("WANDB_API_KEY", raising=False)
        train(compose("train", overrides))
    return output_dir


def test_demo_test_run_has_a_row_per_image_with_the_evaluators_decisions(
    demo_run: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    run_dir = demo_run
    page = run_dir / "report.html"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    post_processor = OneNIPModule.load(run_dir / "checkpoints" / "last.ckpt").post_processor

    # every test image of the data set has its row, scored as the evaluator scored it
    rows = embedded_rows(page)
    test_images = sorted(tiny_demo_root.glob("*/test/*/*.png"))
    assert sorted(Path(unquote(urlparse(row["src"]).path)) for row in rows) == [
        p.resolve() for p in test_images
    ]
    expected = {}
    for row in rows:
        source = Path(unquote(urlparse(row["src"]).path))
        label = int(source.parent.name != "good")
        image_threshold = post_processor.thresholds(row["c"])[0]
        decision = decide(row["s"], image_threshold)
        assert row["c"] == source.parents[2].name and row["y"] == label and row["d"] == int(decision)
        expected[row["n"]] = ("T" if decision == bool(label) else "F") + ("P" if decision else "N")
    for category, values in metrics["per_category"].items():
        mine = [row for row in rows if row["c"] == category]
        assert roc_auc_score([r["y"] for r in mine], [r["s"] for r in mine]) == pytest.approx(
            values["image_AUROC"], abs=1e-6
        )
        counts = {o: sum(expected[r["n"]] == o for r in mine) for o in ("TP", "FP", "FN")}
        f1 = 2 * counts["TP"] / (2 * counts["TP"] + counts["FP"] + counts["FN"])
        assert f1 == pytest.approx(values["image_F1"], abs=1e-6)

    # the drawn page: a row per image, the outcomes and totals the rule gives, filters that filter
    drawn = check_page(page)
    assert {r["data-name"]: r.get("data-outcome") for r in drawn.rows} == expected
    for outcome in ("TP", "FP", "TN", "FN"):
        assert drawn.texts[f"total-{outcome}"] == str(list(expected.values()).count(outcome))
    wrong = check_page(page, "correct=wrong&size=1000")
    assert sorted(r["data-name"] for r in wrong.rows) == sorted(
        n for n, o in expected.items() if o in ("FP", "FN")
    )
    wood = check_page(page, "category=wood&decision=normal")
    assert wood.rows and all(
        r["data-category"] == "wood" and r["data-decision"] == "normal" for r in wood.rows
    )
    assert len(wood.rows) == sum(1 for row in rows if row["c"] == "wood" and row["d"] == 0)
    screenshot = tmp_path / "report.png"
    open_in_chromium(page, screenshot=screenshot)
    assert Image.open(screenshot).size == (1280, 1100)

    # the same rows in W&B
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    assert logged_values(run)["test/review/_type"] == ["table-file"]
    table = _wandb_table(run, "review")
    assert table["columns"][:3] == ["overlay", "name", "category"]
    decisions = {line[1]: line[5] for line in table["data"]}
    assert decisions == {row["n"]: "anomalous" if row["d"] else "normal" for row in rows}
    assert {line[7] for line in table["data"]} <= {"TP", "FP", "TN", "FN"}


def test_official_fusion_rows_are_undecided_and_html_false_keeps_only_the_grids(
    demo_run: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    checkpoint = f"ckpt_path={demo_run / 'checkpoints' / 'last.ckpt'}"
    # the authors' test-set fusion: maps kept until the scale is known, no threshold, so no decision
    official = tiny_overrides(tiny_demo_root, tmp_path / "official", "logger=none", "model.fusion=official")
    evaluate(compose("eval", [*official, checkpoint]))
    metrics = json.loads((tmp_path / "official" / "metrics.json").read_text())
    page = tmp_path / "official" / "report.html"
    rows = embedded_rows(page)
    assert len(rows) == len(list(tiny_demo_root.glob("*/test/*/*.png")))
    assert all(row["d"] is None and row["t"] is None and row["o"] is None for row in rows)
    for category, values in metrics["per_category"].items():
        mine = [row for row in rows if row["c"] == category]
        assert roc_auc_score([r["y"] for r in mine], [r["s"] for r in mine]) == pytest.approx(
            values["image_AUROC"], abs=1e-6
        )
    drawn = check_page(page)
    assert {r["data-decision"] for r in drawn.rows} == {"undecided"}
    assert drawn.texts["total-undecided"] == str(len(rows))
    assert "no threshold fixed in advance" in page.read_text(encoding="utf-8")

    # html=false: the grids stay, no review page
    quiet = tiny_overrides(
        tiny_demo_root,
        tmp_path / "quiet",
        "logger=none",
        "callbacks.report.html=false",
        "callbacks.report.images_per_category=2",
    )
    evaluate(compose("eval", [*quiet, checkpoint]))
    assert (tmp_path / "quiet" / "visuals" / "wood.png").is_file()
    assert not (tmp_path / "quiet" / "report.html").exists() and not (tmp_path / "quiet" / "report").exists()


def test_predict_run_lists_unreadable_files_as_failed_rows(
    tiny_checkpoint: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, source in zip(AWKWARD_NAMES, sorted(tiny_demo_root.glob("wood/test/*/000.png")), strict=False):
        shutil.copy(source, inputs / f"{name}.png")
    (inputs / "broken.png").write_bytes((inputs / f"{AWKWARD_NAMES[0]}.png").read_bytes()[:300])
    overrides = [f"ckpt_path={tiny_checkpoint}", f"input={inputs}", "category=wood", "maps=none"]
    report = predict_files(compose("predict", [*overrides, f"paths.output_dir={tmp_path / 'run'}"]))

    predicted = {Path(row["path"]).stem: row for row in report.rows}
    drawn = check_page(tmp_path / "run" / "report.html")
    assert drawn.rows[0]["data-name"] == "broken.png" and drawn.rows[0]["data-decision"] == "failed"
    assert "truncated" in (tmp_path / "run" / "report.html").read_text()
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["failed"][0]["path"].endswith(
        "broken.png"
    )
    assert [r["data-name"] for r in drawn.rows[1:]] == sorted(
        predicted, key=lambda stem: -float(predicted[stem]["image_score"])
    )
    assert {r["data-name"]: r["data-decision"] for r in drawn.rows[1:]} == {
        stem: row["decision"] for stem, row in predicted.items()
    }
    assert "correctness" not in (tmp_path / "run" / "report.html").read_text()

    predict_files(compose("predict", [*overrides, "report=false", f"paths.output_dir={tmp_path / 'off'}"]))
    assert (tmp_path / "off" / "predictions.csv").is_file() and (tmp_path / "off" / "overlays").is_dir()
    assert not (tmp_path / "off" / "report.html").exists() and not (tmp_path / "off" / "report").exists()


def test_benchmark_script_runs_on_a_tiny_size(tmp_path: Path, monkeypatch, capsys) -> None:
    arguments = ["--rows", "6", "--repeats", "1", "--image-size", "32", "--categories", "2"]
    monkeypatch.setattr(
        sys, "argv", ["benchmark_report.py", *arguments, "--json", str(tmp_path / "bench.json")]
    )
    runpy.run_path(str(REPO_ROOT / "scripts" / "benchmark_report.py"), run_name="__main__")
    summary = json.loads((tmp_path / "bench.json").read_text())["summary"]
    assert summary["total_s"]["median"] > 0 and summary["report_MB"]["median"] > 0
    assert "6 rows at 32 px in 2 categories" in capsys.readouterr().out
