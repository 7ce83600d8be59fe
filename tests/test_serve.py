"""The inspection server, as a line would call it: a real `python -m onenip_pl.serve` process on 127.0.0.1.

One server per module (started once, killed at teardown) on the tiny trained checkpoint. Its answers are
compared with the Python detector's for the same image and category; each bad input must get a 4xx with a
one-line JSON message, and the next good request must still be answered correctly.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import run_cli
from PIL import Image

from onenip_pl.calibration.decision import decide
from onenip_pl.checkpoint_file import file_sha256
from onenip_pl.inference import Detection, OneNIPDetector
from onenip_pl.inference.visualize import map_png16

pytest_plugins = ["fixtures_checkpoint"]  # the shared tiny_checkpoint fixture

STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 60
# The server scores an image in a batch of other images, the reference alone: float32 sums over the same
# terms in another order. Scores are O(100) sums of O(10^3) terms; 1e-5 relative is ~100 float32 ulps.
RELATIVE_TOLERANCE = 1e-5
MAX_REQUEST_BYTES = 1_000_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (its LitServe and uvicorn workers), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@contextlib.contextmanager
def running_server(checkpoint: Path, workdir: Path, *overrides: str) -> Iterator[str]:
    """`python -m onenip_pl.serve` on a free loopback port: its base URL once /health answers (a bounded
    wait), the process group stopped on exit."""
    port = free_port()
    log_path = workdir / "server.log"
    command = [
        sys.executable,
        "-m",
        "onenip_pl.serve",
        f"ckpt_path={checkpoint}",
        f"port={port}",
        f"paths.log_dir={workdir}",
        "log_level=warning",
        *overrides,
    ]
    environment = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=environment,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory) -> Iterator[str]:
    """The module's one server: PyTorch on the CPU, batches of up to 8 filled for at most 20 ms, bodies up
    to 1 MB (every test image is smaller)."""
    workdir = tmp_path_factory.mktemp("serve")
    overrides = ("max_batch_size=8", "batch_timeout_ms=20", f"max_request_bytes={MAX_REQUEST_BYTES}")
    with running_server(tiny_checkpoint, workdir, *overrides) as url:
        yield url


@pytest.fixture(scope="module")
def detector(tiny_checkpoint: Path) -> OneNIPDetector:
    return OneNIPDetector.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def expected(detector: OneNIPDetector) -> Callable[[Path, str | None], Detection]:
    """The detector's detection of a file for a category (None: retrieved), computed once per pair."""
    return functools.cache(lambda path, category: detector.predict(path, category=category)[0])


@pytest.fixture(scope="module")
def images(tiny_demo_root: Path, tmp_path_factory) -> dict[str, Path]:
    """Test images of every category, and one saved as JPEG, BMP, 8-bit gray TIFF and 16-bit gray PNG."""
    directory = tmp_path_factory.mktemp("serve_images")
    chosen = {
        f"{category}.png": sorted(tiny_demo_root.glob(f"{category}/test/*/*.png"))[-1]
        for category in ("washer", "weave", "wood")
    }
    source = Image.open(chosen["wood.png"]).convert("RGB")
    source.resize((150, 100)).save(directory / "wide.jpg", quality=92)
    source.save(directory / "wood.bmp")
    source.convert("L").save(directory / "gray.tif")
    Image.fromarray(np.asarray(source.convert("L")).astype(np.uint16) * 257).save(directory / "gray16.png")
    return {**chosen, **{path.name: path for path in directory.iterdir()}}


def huge_png(side: int = 12_000) -> bytes:
    """A valid side×side 1-bit PNG: a few kB on the wire, `side`² pixels once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(9)
    row = b"\x00" + bytes(side // 8)  # filter byte, then side bits of black
    pixels = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def post_image(url: str, data: bytes, **params: str) -> requests.Response:
    return requests.post(f"{url}/predict", data=data, params=params, timeout=REQUEST_TIMEOUT_S)


def assert_matches_detector(answer: dict, expected: Detection, detector: OneNIPDetector) -> None:
    """The server's answer is the detector's `expected` one: category, similarity, score, decision,
    thresholds."""
    assert answer["category"] == expected.category
    assert answer["image_score"] == pytest.approx(expected.score, rel=RELATIVE_TOLERANCE)
    if expected.similarity is None:
        assert answer["similarity"] is None
    else:
        assert answer["similarity"] == pytest.approx(expected.similarity, abs=1e-5)
    image_threshold, pixel_threshold = detector.thresholds(expected.category)
    assert answer["thresholds"] == {
        "image": pytest.approx(image_threshold),
        "pixel": pytest.approx(pixel_threshold),
    }
    # the server decides its own score by the one rule; that is the detector's decision unless the two
    # scores straddle the threshold within the float32 tolerance
    assert answer["anomalous"] == decide(answer["image_score"], image_threshold)
    if abs(expected.score - image_threshold) > RELATIVE_TOLERANCE * abs(image_threshold):
        assert answer["anomalous"] == expected.decision
        assert answer["decision"] == expected.verdict
    height, width = expected.anomaly_map.shape
    assert (answer["height"], answer["width"]) == (height, width)


def test_answers_equal_the_detectors(server: str, detector, expected, images, tiny_checkpoint: Path) -> None:
    sha256 = file_sha256(tiny_checkpoint)
    for name, path in sorted(images.items()):
        answer = post_image(server, path.read_bytes())
        assert answer.status_code == 200, (name, answer.text)
        assert answer.json()["model"]["checkpoint_sha256"] == sha256
        assert_matches_detector(answer.json(), expected(path, None), detector)
    # a category given as a query parameter, and as a multipart field with the image as a file part
    path = images["gray16.png"]
    answer = post_image(server, path.read_bytes(), category="weave")
    assert answer.status_code == 200, answer.text
    assert_matches_detector(answer.json(), expected(path, "weave"), detector)
    with open(path, "rb") as handle:
        answer = requests.post(
            f"{server}/predict",
            files={"image": handle},
            data={"category": "weave"},
            timeout=REQUEST_TIMEOUT_S,
        )
    assert answer.status_code == 200, answer.text
    assert_matches_detector(answer.json(), expected(path, "weave"), detector)


def test_map_and_overlay_on_request(server: str, detector, expected, images) -> None:
    path = images["wide.jpg"]
    answer = post_image(server, path.read_bytes(), category="wood", map="png16", overlay="1")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    gray16 = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["anomaly_map_png16"]))))
    picture = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    reference = expected(path, "wood")
    assert body["map_full_scale"] == pytest.approx(2.0 * detector.pixel_threshold)
    assert gray16.dtype == np.uint16 and gray16.shape == reference.anomaly_map.shape == (100, 150)
    scaled = map_png16(reference.anomaly_map, body["map_full_scale"]).astype(np.int64)
    # one 16-bit step of rounding either way (the two maps agree to float32 precision, not bit for bit)
    assert np.abs(gray16.astype(np.int64) - scaled).max() <= 1
    assert picture.mode == "RGB" and picture.size == (150, 100)
    plain = post_image(server, path.read_bytes(), category="wood").json()
    assert "anomaly_map_png16" not in plain and "overlay_png" not in plain


def test_health_and_info(server: str, detector, tiny_checkpoint: Path) -> None:
    assert requests.get(f"{server}/health", timeout=REQUEST_TIMEOUT_S).text == "ok"
    model = requests.get(f"{server}/info", timeout=REQUEST_TIMEOUT_S).json()["model"]
    assert model["categories"] == detector.categories
    assert model["image_size"] == detector.image_size
    assert model["thresholds"] == detector.post_processor.threshold_table()
    assert model["checkpoint_sha256"] == file_sha256(tiny_checkpoint)
    assert model["version"] and model["runtime"] == "torch" and model["max_image_pixels"] == 50_000_000


BAD_REQUESTS = {
    # name: (request keyword arguments, expected status, words the message must contain)
    "not an image": ({"data": b"these bytes are no image at all"}, 415, ("not an image",)),
    "empty body": ({"data": b""}, 400, ("empty",)),
    "body over max_request_bytes": (
        {"data": bytes(MAX_REQUEST_BYTES + 1)},
        413,
        (f"max_request_bytes={MAX_REQUEST_BYTES:,}",),
    ),
    "unknown category": ({"category": "carpet"}, 422, ("'carpet'", "wood")),
    "misspelt option": ({"categroy": "wood"}, 400, ("categroy",)),
    "malformed multipart": (
        {
            "data": b"--abc\r\nno headers and no end",
            "headers": {"Content-Type": "multipart/form-data; boundary=abc"},
        },
        400,
        ("multipart",),
    ),
    "multipart without boundary": (
        {"data": b"whatever", "headers": {"Content-Type": "multipart/form-data"}},
        400,
        ("multipart", "boundary"),
    ),
    "multipart without a file": ({"files": {"category": (None, "wood")}}, 400, ("file part",)),
}


def _send(url: str, image: bytes, arguments: dict) -> requests.Response:
    arguments = dict(arguments)
    params = {key: arguments.pop(key) for key in ("category", "categroy") if key in arguments}
    if "files" not in arguments:
        arguments.setdefault("data", image)
    return requests.post(f"{url}/predict", params=params, timeout=REQUEST_TIMEOUT_S, **arguments)


def assert_refused(response: requests.Response, status: int, words: tuple[str, ...]) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["detail"] and "\n" not in body["detail"], body
    for word in words:
        assert word in body["detail"], body


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_refused_and_the_server_keeps_serving(
    server: str, detector, expected, images, case: str
) -> None:
    arguments, status, words = BAD_REQUESTS[case]
    good = images["wood.png"]
    assert_refused(_send(server, good.read_bytes(), arguments), status, words)
    answer = post_image(server, good.read_bytes())
    assert answer.status_code == 200, answer.text
    assert_matches_detector(answer.json(), expected(good, None), detector)


def test_truncated_and_huge_images_are_refused(server: str, detector, expected, images) -> None:
    good = images["wood.png"]
    assert_refused(post_image(server, good.read_bytes()[:300]), 400, ("truncated",))
    huge = huge_png()
    with warnings.catch_warnings():  # Pillow warns of the size while reading the header
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert Image.open(io.BytesIO(huge)).size == (12_000, 12_000)  # a real image, refused by its header
    assert_refused(post_image(server, huge), 413, ("12000x12000", "max_image_pixels=50,000,000"))
    answer = post_image(server, good.read_bytes())
    assert answer.status_code == 200, answer.text
    assert_matches_detector(answer.json(), expected(good, None), detector)


def test_concurrent_requests_with_one_broken(server: str, detector, expected, images) -> None:
    """100 requests from 16 clients at once, one of them truncated: that one alone is refused, every other
    answer equals the detector's, whichever batch it was scored in."""
    names = ["washer.png", "weave.png", "wood.png", "gray16.png", "wide.jpg"]
    payloads = {name: images[name].read_bytes() for name in names}
    jobs = [(names[index % len(names)], "wood" if index % 3 == 0 else None) for index in range(100)]
    broken = 37

    def call(index: int) -> requests.Response:
        name, category = jobs[index]
        data = payloads[name][:200] if index == broken else payloads[name]
        return post_image(server, data, **({"category": category} if category else {}))

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(call, range(len(jobs)), timeout=300))
    assert_refused(answers[broken], 400, ("truncated",))
    for index, answer in enumerate(answers):
        if index != broken:
            name, category = jobs[index]
            assert answer.status_code == 200, (index, answer.text)
            assert_matches_detector(answer.json(), expected(images[name], category), detector)


def test_openvino_server_answers_as_the_openvino_detector(
    tiny_checkpoint: Path, images, tmp_path: Path
) -> None:
    """runtime=openvino: the server's answers equal the detector's on the same runtime, in one batch."""
    pytest.importorskip("openvino")
    detector = OneNIPDetector.from_checkpoint(tiny_checkpoint, runtime="openvino")
    names = ["washer.png", "weave.png", "wood.png", "gray16.png", "wide.jpg"]
    with running_server(tiny_checkpoint, tmp_path, "runtime=openvino", "batch_timeout_ms=200") as url:
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            answers = list(pool.map(lambda name: post_image(url, images[name].read_bytes()), names))
        assert requests.get(f"{url}/info", timeout=REQUEST_TIMEOUT_S).json()["model"]["runtime"] == "openvino"
    for name, answer in zip(names, answers, strict=True):
        assert answer.status_code == 200, (name, answer.text)
        assert_matches_detector(answer.json(), detector.predict(images[name])[0], detector)


def test_unreadable_checkpoint_stops_serve(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    result = run_cli(
        "onenip_pl.serve",
        f"ckpt_path={broken}",
        f"port={free_port()}",
        f"paths.log_dir={tmp_path}",
        timeout=300,
    )
    assert result.returncode != 0
    assert f"checkpoint {broken} is not a readable torch checkpoint" in result.output
    assert "Traceback" not in result.output


def test_missing_extra_is_named(tmp_path: Path) -> None:
    """With litserve unimportable (None in sys.modules blocks an import), serve names the extra to install."""
    result = run_cli(
        "onenip_pl.serve",
        f"ckpt_path={tmp_path}/any.ckpt",
        f"paths.log_dir={tmp_path}",
        timeout=300,
        blocked=("litserve",),
    )
    output = result.output
    assert result.returncode != 0
    assert "needs litserve" in output and "pip install 'onenip-pl[deploy]'" in output, output
    assert "Traceback" not in output
