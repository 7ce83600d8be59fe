"""scripts/prepare_data.py: archives built here in each release's shape, and a local HTTP server for
resumed downloads (nothing can be fetched from the internet in tests)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from dataset_trees import make_archive, make_btad_tree, make_mvtec_tree, make_visa_tree, write_image

from onenip_pl.data.readers import read_dataset
from onenip_pl.errors import DataError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prepare_data = load_script()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mvtec_from_a_local_tar_xz_lands_in_root_and_reads(tmp_path, capsys):
    counts = make_mvtec_tree(tmp_path / "tree", ("bottle", "screw"))
    archive = make_archive(tmp_path / "tree", tmp_path / "mvtec_anomaly_detection.tar.xz")
    root = tmp_path / "data" / "mvtec"
    assert (
        prepare_data.main(["mvtec", "--root", str(root), "--archive", str(archive), "--skip-checksum"]) == 0
    )
    assert (root / "license.txt").is_file() and not (root / ".unpack").exists()
    assert archive.is_file()
    records = read_dataset("mvtec", root)
    assert len(records) == sum(c.train + c.test for c in counts.values())
    assert "3 / 209" in capsys.readouterr().out


def test_visa_tar_with_a_top_folder_is_unpacked_so_root_is_data_root(tmp_path):
    make_visa_tree(tmp_path / "tree", ("candle", "pcb2"))
    archive = make_archive(tmp_path / "tree", tmp_path / "VisA_20220922.tar", top_folder="VisA_20220922")
    root = tmp_path / "visa"
    sha = sha256_of(archive)
    assert prepare_data.main(["visa", "--root", str(root), "--archive", str(archive), "--sha256", sha]) == 0
    assert (root / "split_csv" / "1cls.csv").is_file()
    assert {r.category for r in read_dataset("visa", root)} == {"candle", "pcb2"}


def test_btad_zip_unpacks_from_its_archive_folder(tmp_path):
    make_btad_tree(tmp_path / "tree")
    archive = make_archive(tmp_path / "tree", tmp_path / "btad.zip", top_folder="BTech_Dataset_transformed")
    root = tmp_path / "btad"
    assert prepare_data.main(["btad", "--root", str(root), "--archive", str(archive), "--skip-checksum"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["01", "02", "03"]


def test_dtd_tar_gz_lands_with_images_under_root(tmp_path):
    rng = np.random.default_rng(0)
    for texture in ("banded", "dotted"):
        for index in range(2):
            write_image(
                tmp_path / "tree" / "images" / texture / f"{texture}_{index:04d}.jpg", rng, size=(48, 40)
            )
    (tmp_path / "tree" / "labels").mkdir()
    (tmp_path / "tree" / "labels" / "labels_joint_anno.txt").write_text("banded/banded_0000.jpg banded\n")
    archive = make_archive(tmp_path / "tree", tmp_path / "dtd-r1.0.1.tar.gz", top_folder="dtd")
    root = tmp_path / "dtd"
    assert prepare_data.main(["dtd", "--root", str(root), "--archive", str(archive), "--skip-checksum"]) == 0
    assert len(list((root / "images").glob("*/*.jpg"))) == 4
    assert (root / "labels" / "labels_joint_anno.txt").is_file()


def test_checksum_and_size_are_enforced(tmp_path, capsys):
    make_btad_tree(tmp_path / "tree", ("01",))
    archive = make_archive(tmp_path / "tree", tmp_path / "btad.zip", top_folder="BTech_Dataset_transformed")
    root = tmp_path / "btad"
    assert prepare_data.main(["btad", "--root", str(root), "--archive", str(archive)]) == 1
    assert f"expected {prepare_data.SOURCES['btad'].sha256}" in capsys.readouterr().out
    assert not (root / "01").exists()
    with pytest.raises(DataError, match="has .* bytes but the official archive has 5,264,982,680"):
        prepare_data.verify_archive(archive, size=prepare_data.SOURCES["mvtec"].size, sha256=None)


def test_an_already_prepared_root_is_only_checked(tmp_path, capsys):
    make_mvtec_tree(tmp_path / "mvtec", ("bottle",))
    assert (
        prepare_data.main(["mvtec", "--root", str(tmp_path / "mvtec"), "--archive", "/nonexistent.tar"]) == 0
    )
    assert "already at" in capsys.readouterr().out


def test_install_refuses_to_overwrite_and_a_broken_tree_fails_the_check(tmp_path, capsys):
    make_mvtec_tree(tmp_path / "tree", ("bottle",))
    archive = make_archive(tmp_path / "tree", tmp_path / "mvtec.tar.gz")
    root = tmp_path / "mvtec"
    root.mkdir()
    (root / "license.txt").write_text("mine")
    args = ["mvtec", "--root", str(root), "--archive", str(archive), "--skip-checksum"]
    assert prepare_data.main(args) == 1
    assert "already holds" in capsys.readouterr().out and (root / "license.txt").read_text() == "mine"
    (root / "license.txt").unlink()
    (tmp_path / "tree" / "bottle" / "ground_truth" / "broken" / "001_mask.png").unlink()
    make_archive(tmp_path / "tree", archive)
    assert prepare_data.main(args) == 1
    assert "broken/001.png has no mask" in capsys.readouterr().out


def test_archives_with_members_outside_the_destination_are_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w") as handle:
        handle.add(payload, "../escaped.txt")
    with pytest.raises(DataError, match="points outside the destination"):
        prepare_data.unpack(evil, tmp_path / "out", say=lambda _: None)
    assert not (tmp_path / "escaped.txt").exists()
    not_an_archive = tmp_path / "x.tar"
    not_an_archive.write_bytes(b"hello")
    with pytest.raises(DataError, match="neither a zip nor a tar"):
        prepare_data.unpack(not_an_archive, tmp_path / "out2", say=lambda _: None)


# ---------------------------------------------------------------- downloads over HTTP


class ArchiveServer(ThreadingHTTPServer):
    """Serves one payload at /btad.zip, honouring Range or not, and can cut the first reply short."""

    def __init__(self, payload: bytes, *, honour_range: bool = True, cut_first_at: int | None = None):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.payload, self.honour_range, self.cut_first_at = payload, honour_range, cut_first_at
        self.ranges: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/btad.zip"


class RangeHandler(BaseHTTPRequestHandler):
    server: ArchiveServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/btad.zip":
            self.send_error(404)
            return
        payload, requested = self.server.payload, self.headers.get("Range")
        self.server.ranges.append(requested)
        start = (
            int(requested.removeprefix("bytes=").rstrip("-")) if requested and self.server.honour_range else 0
        )
        body = payload[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_first_at is not None:
            body, self.server.cut_first_at = body[: self.server.cut_first_at], None
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(payload: bytes, **options) -> ArchiveServer:
        server = ArchiveServer(payload, **options)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def btad_archive(tmp_path: Path) -> Path:
    make_btad_tree(tmp_path / "tree", ("02",), size=(64, 80))
    return make_archive(tmp_path / "tree", tmp_path / "btad.zip", top_folder="BTech_Dataset_transformed")


def test_download_resumes_a_partial_file_with_a_range_request(tmp_path, serve):
    archive = btad_archive(tmp_path)
    payload = archive.read_bytes()
    server = serve(payload)
    target = tmp_path / "dl" / "btad.zip"
    target.parent.mkdir()
    half = len(payload) // 2
    (target.parent / "btad.zip.part").write_bytes(payload[:half])
    prepare_data.download(server.url, target, size=len(payload), say=lambda _: None)
    assert server.ranges == [f"bytes={half}-"]
    assert target.read_bytes() == payload
    assert not (target.parent / "btad.zip.part").exists()


def test_download_restarts_when_the_server_ignores_ranges(tmp_path, serve):
    payload = btad_archive(tmp_path).read_bytes()
    server = serve(payload, honour_range=False)
    target = tmp_path / "dl" / "btad.zip"
    target.parent.mkdir()
    (target.parent / "btad.zip.part").write_bytes(b"stale bytes from another file")
    prepare_data.download(server.url, target, say=lambda _: None)
    assert target.read_bytes() == payload


def test_download_retries_a_dropped_connection_from_where_it_stopped(tmp_path, serve):
    payload = btad_archive(tmp_path).read_bytes()
    server = serve(payload, cut_first_at=1000)
    target = tmp_path / "dl" / "btad.zip"
    prepare_data.download(server.url, target, say=lambda _: None)
    assert server.ranges == [None, "bytes=1000-"]
    assert target.read_bytes() == payload


def test_end_to_end_download_verify_unpack_check_and_clean_up(tmp_path, serve, capsys):
    archive = btad_archive(tmp_path)
    server = serve(archive.read_bytes())
    root = tmp_path / "btad"
    args = ["btad", "--root", str(root), "--url", server.url, "--sha256", sha256_of(archive)]
    assert prepare_data.main(args) == 0
    assert {r.category for r in read_dataset("btad", root)} == {"02"}
    assert not (root / prepare_data.DOWNLOAD_DIR).exists()
    missing = server.url.replace("btad.zip", "gone.zip")
    assert prepare_data.main(["btad", "--root", str(tmp_path / "other"), "--url", missing]) == 1
    output = capsys.readouterr().out
    assert "HTTP 404" in output and "--archive PATH" in output


def test_a_download_failing_its_checksum_is_kept_and_the_way_out_explained(tmp_path, serve, capsys):
    archive = btad_archive(tmp_path)
    server = serve(archive.read_bytes())
    root = tmp_path / "btad"
    assert prepare_data.main(["btad", "--root", str(root), "--url", server.url, "--sha256", "0" * 64]) == 1
    kept = root / prepare_data.DOWNLOAD_DIR / "btad.zip"
    output = capsys.readouterr().out
    assert f"--archive {kept} --skip-checksum" in output
    assert kept.read_bytes() == archive.read_bytes()
    assert not (root / "02").exists()
