"""How long a decision takes: per-image latency and throughput of the detector on each runtime, beside the
authors' code, and through the inspection server.

What is timed is what a line pays for one image: PNG bytes decoded, resized to the model's input, the
anomaly map computed against the category's normal prompt, and the decision taken by the calibrated
threshold (``OneNIPDetector.predict`` with ``category=``, so no retrieval). Per batch size: the wall time
of each call (median, p90, p99 over the calls; at batch 1 that is the per-image latency) and images/s.

Models (random weights: speed does not depend on them), each enrolled on generated normal images, so that
it has a prompt and thresholds, and saved as a checkpoint that every runtime and the server load:

* ``demo``: what ``experiment=demo`` builds (EfficientNet-Lite0, 128/512 hidden, 2+2 layers, 224 px);
* ``authors``: the paper's model, ``experiment=mvtec`` (EfficientNet-B4, 256/1024 hidden, 4+4 layers, 224 px).

Positional ``key=value`` Hydra overrides apply to every width (e.g. ``data.image_size=64`` for a smoke
test). Each runtime is measured in a fresh process. In the same sitting, ``bench_speed.py infer --bs 1`` of
``../shared/reference/authors-code`` times the authors' model at batch 1 on the same CPU (see its README
for the one-off set-up); ``--server`` then starts ``python -m onenip_pl.serve`` on 127.0.0.1 and measures
requests/s and latency with 1 and 8 concurrent clients.

CPU (alone on the machine)::

    python scripts/benchmark_latency.py --device cpu --widths demo,authors --images 100 --batch-sizes 1,8 \\
        --server --json latency_cpu.json

GPU::

    python scripts/benchmark_latency.py --device cuda --precision bf16 --batch-sizes 1,64 --json gpu_bf16.json
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchmark import GeneratedImages, load_average, run_isolated

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDTHS = {"demo": "experiment=demo", "authors": "experiment=mvtec"}
RUNTIME_NAMES = ("torch", "onnxruntime", "openvino")
CATEGORY = "bench"
# normal images enrolled per model: one becomes the prompt, the others fix its thresholds
ENROLL_IMAGES = 4
AUTHORS_CODE = REPO_ROOT.parent / "shared" / "reference" / "authors-code"
SERVER_START_TIMEOUT_S = 600


# ---- settings -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every width's train config")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16"), help="torch rows (autocast); compiled: fp32"
    )
    parser.add_argument("--batch-sizes", default="1,8", help="comma list (default: 1,8)")
    parser.add_argument("--images", type=int, default=100, help="images per batch size (default: 100)")
    parser.add_argument("--widths", default="demo,authors", help=f"comma list of {', '.join(WIDTHS)}")
    parser.add_argument("--runtimes", default=",".join(RUNTIME_NAMES), help="comma list (default: all)")
    parser.add_argument("--threads", type=int, help="CPU threads of every runtime (default: torch's)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default: 5)")
    parser.add_argument("--source-size", type=int, default=512, help="side of the PNG images (default: 512)")
    parser.add_argument("--authors-python", default=str(Path.home() / "authors-venv" / "bin" / "python"))
    parser.add_argument("--authors-code", default=str(AUTHORS_CODE), help="folder with bench_speed.py")
    parser.add_argument("--authors-reps", type=int, default=30, help="timed batch-1 calls of their model")
    parser.add_argument("--no-authors", action="store_true", help="leave the authors' code out")
    parser.add_argument("--server", action="store_true", help="also measure python -m onenip_pl.serve")
    parser.add_argument("--server-runtimes", help="comma list (default: --runtimes)")
    parser.add_argument("--clients", default="1,8", help="concurrent clients (default: 1,8)")
    parser.add_argument("--requests", type=int, default=1000, help="per client count (default: 1000)")
    parser.add_argument("--quick", action="store_true", help="smoke test: few images, calls and requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here (and the table beside, as .md)")
    args = parser.parse_intermixed_args(argv)
    if args.quick:
        args.images, args.warmup, args.authors_reps, args.requests = 8, 1, 2, 16
    return args


def comma_list(text: str, allowed: tuple[str, ...] | None, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if unknown or not items:
        raise SystemExit(f"{option}={text!r}: use a comma list of {', '.join(allowed or ('numbers',))}")
    return items


def runtime_unavailable(runtime: str, device: str) -> str | None:
    """Why ``runtime`` cannot be measured here, or None."""
    if runtime == "torch":
        return None
    if device != "cpu":
        return f"{runtime} runs on the CPU; not measured with --device {device}"
    from onenip_pl.errors import ConfigError
    from onenip_pl.extras import require_extra
    from onenip_pl.inference.runtimes import RUNTIME_PACKAGES

    try:
        require_extra("deploy", f"runtime={runtime}", RUNTIME_PACKAGES[runtime])
    except ConfigError as error:
        return str(error)
    return None


# ---- the model and its images -------------------------------------------------------------------------


def prepare_width(width: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """The width's model with random weights, enrolled on generated normal images and saved as a
    checkpoint, and the PNG files to time; what the measuring processes need."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from PIL import Image

    from onenip_pl.checkpoint_format import module_checkpoint
    from onenip_pl.config import compose
    from onenip_pl.inference import OneNIPDetector

    overrides = [WIDTHS[width], "model.pretrained=false", "logger=none", *args.overrides]
    cfg = compose("train", overrides)
    module = instantiate(cfg.model)
    count = max(args.images, max(args.batch_sizes) * 3)
    source = GeneratedImages(1, ENROLL_IMAGES + count, args.source_size, args.seed)
    images = [source.image(index) for index in range(len(source.records))]
    detector = OneNIPDetector(module.net, module.prompt_bank, module.post_processor)
    detector.enroll(CATEGORY, images[:ENROLL_IMAGES], prompts=1)
    folder = scratch / width
    folder.mkdir()
    checkpoint = folder / "model.ckpt"
    torch.save(module_checkpoint(module), checkpoint)
    pngs = []
    for index, image in enumerate(images[ENROLL_IMAGES:]):
        pngs.append(folder / f"{index:04d}.png")
        Image.fromarray(image).save(pngs[-1])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return {
        "width": width,
        "overrides": overrides,
        "checkpoint": str(checkpoint),
        "pngs": [str(path) for path in pngs],
        "model": {key: model[key] for key in ("backbone", "image_size", "hidden_dim", "feedforward_dim")}
        | {"layers": f"{model['num_encoder_layers']}+{model['num_decoder_layers']}"},
        "parameters_M": sum(p.numel() for p in module.net.parameters()) / 1e6,
        "image_threshold": detector.thresholds(CATEGORY)[0],
    }


# ---- in-process latency -------------------------------------------------------------------------------


def percentiles(milliseconds: list[float]) -> dict[str, float]:
    median, p90, p99 = np.percentile(milliseconds, [50, 90, 99])
    return {
        "median_ms": float(median),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "min_ms": min(milliseconds),
        "max_ms": max(milliseconds),
        "p99_over_median": float(p99 / median),
    }


def runtime_phase(settings: dict[str, Any]) -> dict[str, Any]:
    """One runtime of one width, in its own process: build the detector, then time each batch size."""
    from PIL import Image

    from onenip_pl.inference import OneNIPDetector

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    start = time.perf_counter()
    detector = OneNIPDetector.from_checkpoint(
        settings["checkpoint"], device=settings["device"], runtime=settings["runtime"]
    )
    build_s = time.perf_counter() - start
    pngs = [Path(path).read_bytes() for path in settings["pngs"]]
    autocast = (
        torch.autocast(settings["device"], dtype=torch.bfloat16)
        if settings["runtime"] == "torch" and settings["precision"] == "bf16"
        else contextlib.nullcontext()
    )
    rows = []
    with autocast:
        for batch in settings["batch_sizes"]:
            calls = max(3, settings["images"] // batch)
            chunks = [[pngs[(call * batch + i) % len(pngs)] for i in range(batch)] for call in range(calls)]

            def decide(chunk: list[bytes]) -> list[bool | None]:
                # the whole path of a camera frame: PNG bytes -> RGB -> resize -> map -> decision
                pictures = [Image.open(io.BytesIO(data)) for data in chunk]
                detections = detector.predict(pictures, category=CATEGORY, batch_size=len(chunk))
                return [detection.decision for detection in detections]

            for call in range(settings["warmup"]):
                decide(chunks[call % calls])
            times, decisions = [], []
            for chunk in chunks:
                begin = time.perf_counter()
                decisions += decide(chunk)
                times.append(1000 * (time.perf_counter() - begin))
            if any(decision is None for decision in decisions):
                raise SystemExit(f"{settings['width']}: no threshold to decide by; the enrollment failed")
            rows.append(
                {
                    "batch": batch,
                    "calls": calls,
                    "images": calls * batch,
                    **percentiles(times),
                    "images_per_s": 1000 * calls * batch / sum(times),
                    "anomalous": sum(decisions),
                }
            )
    return {"build_s": build_s, "threads": torch.get_num_threads(), "rows": rows}


# ---- the authors' code --------------------------------------------------------------------------------


def authors_phase(args: argparse.Namespace) -> dict[str, Any]:
    """``bench_speed.py infer --bs 1`` of the authors' runner: their model (B4, 224 px, random weights) on
    this CPU; a dict with ``skipped`` (the reason) when it cannot run here."""
    code, python = Path(args.authors_code), Path(args.authors_python)
    official = os.environ.get("ONENIP_OFFICIAL_SRC", str(Path.home() / "authors-onenip"))
    if args.device != "cpu":
        return {"skipped": "the authors' runner is the CPU one; compare on --device cpu"}
    needed = ((code / "bench_speed.py", "the authors' runner"), (python, "the authors' venv python"))
    for path, what in needed:
        if not path.exists():
            return {"skipped": f"{what} {path} is absent (set-up: {code / 'README.md'})"}
    if not Path(official).is_dir():
        return {"skipped": f"ONENIP_OFFICIAL_SRC={official} is not a folder of the authors' tree"}
    threads = args.threads or torch.get_num_threads()
    command = [
        str(python),
        "bench_speed.py",
        "infer",
        "--bs",
        "1",
        "--reps",
        str(args.authors_reps),
        "--warmup",
        "1" if args.quick else "3",
        "--threads",
        str(threads),
        *(["--quiet-wait", "0"] if args.quick else []),
    ]
    environment = {**os.environ, "ONENIP_OFFICIAL_SRC": official}
    result = subprocess.run(command, cwd=code, env=environment, capture_output=True, text=True, timeout=3600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"the authors' runner failed (exit {result.returncode}): {tail[0]}"}
    report = json.loads(lines[-1][len("RESULT ") :])
    return {
        "command": " ".join(command),
        "torch": report["torch"],
        "threads": report["threads"],
        "reps": args.authors_reps,
        "median_ms": 1000 * report["median_s"],
        "min_ms": 1000 * report["min_s"],
        "max_ms": 1000 * report["max_s"],
        "median_basis": report.get("median_basis"),
    }


# ---- the server ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None):
    connection.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"})
    response = connection.getresponse()
    return response.status, response.read()


def wait_until_healthy(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"the server exited ({server.returncode}): {' | '.join(tail)}")
        with contextlib.suppress(OSError):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            if request(connection, "GET", "/health")[0] == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer GET /health within {SERVER_START_TIMEOUT_S} s")


def load(port: int, clients: int, requests: int, pngs: list[bytes]) -> dict[str, Any]:
    """``requests`` POST /predict over ``clients`` concurrent keep-alive connections."""
    path = f"/predict?category={CATEGORY}"

    def client(index: int) -> tuple[list[float], int]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        times, errors = [], 0
        for number in range(index, requests, clients):
            begin = time.perf_counter()
            try:
                status, body = request(connection, "POST", path, pngs[number % len(pngs)])
                errors += status != 200 or "decision" not in json.loads(body)
            except (OSError, http.client.HTTPException, ValueError):
                errors += 1
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            times.append(1000 * (time.perf_counter() - begin))
        return times, errors

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - begin
    times = [t for client_times, _ in results for t in client_times]
    return {
        "clients": clients,
        "requests": requests,
        "errors": sum(errors for _, errors in results),
        "requests_per_s": requests / wall,
        **percentiles(times),
    }


def server_phase(prepared: dict[str, Any], runtime: str, args: argparse.Namespace, scratch: Path) -> dict:
    port = free_port()
    log = scratch / f"serve_{prepared['width']}_{runtime}.log"
    command = [
        sys.executable,
        "-m",
        "onenip_pl.serve",
        f"ckpt_path={prepared['checkpoint']}",
        "host=127.0.0.1",
        f"port={port}",
        f"runtime={runtime}",
        f"device={args.device}",
        "max_batch_size=8",
        "batch_timeout_ms=5",
    ]
    pngs = [Path(path).read_bytes() for path in prepared["pngs"]]
    with log.open("w") as output:
        # its own process group, so that stopping it stops the workers it starts too
        server = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
        )
    try:
        wait_until_healthy(port, server, log)
        load(port, 2, max(4, args.warmup), pngs)
        rows = [load(port, clients, args.requests, pngs) for clients in args.client_counts]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return {"command": " ".join(command), "rows": rows}


# ---- report -------------------------------------------------------------------------------------------


def format_tables(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"Latency: decode PNG ({s['source_size']} px) -> resize -> map -> decision, {s['device']}, "
        f"threads {report['threads']}, torch {s['precision']}; {report['cpu']}; load average before "
        f"{report['load_before']}, after {report['load_after']}",
        "",
        "| width | runtime | batch | calls | median ms | p90 ms | p99 ms | p99/median | images/s | build s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    skipped = []
    for width, entry in report["widths"].items():
        for runtime, result in entry["runtimes"].items():
            if "skipped" in result:
                skipped.append(f"- {width} / {runtime}: skipped: {result['skipped']}")
                continue
            label = f"{runtime} ({s['precision']})" if runtime == "torch" else runtime
            for row in result["rows"]:
                lines.append(
                    f"| {width} | {label} | {row['batch']} | {row['calls']} | {row['median_ms']:.1f} | "
                    f"{row['p90_ms']:.1f} | {row['p99_ms']:.1f} | {row['p99_over_median']:.2f} | "
                    f"{row['images_per_s']:.1f} | {result['build_s']:.1f} |"
                )
    authors = report.get("authors")
    if authors is not None:
        lines.append("")
        if "skipped" in authors:
            skipped.append(f"- authors' code: skipped: {authors['skipped']}")
        else:
            lines += [
                f"Authors' code, batch 1 (model forward on 224-px tensors, torch {authors['torch']}, threads "
                f"{authors['threads']}, {authors['reps']} reps, {authors['median_basis']}): median "
                f"{authors['median_ms']:.1f} ms (min {authors['min_ms']:.1f}, max {authors['max_ms']:.1f})",
                f"`{authors['command']}`",
            ]
            if report.get("ratio"):
                ratio = report["ratio"]
                lines.append(
                    f"Fastest at the authors' width, batch 1: {ratio['runtime']} {ratio['median_ms']:.1f} ms "
                    f"(p99/median {ratio['p99_over_median']:.2f}): {ratio['speedup']:.2f}x the authors' code"
                )
    servers = report.get("server")
    if servers:
        lines += [
            "",
            "| width | server runtime | clients | requests | errors | requests/s | median ms | p99 ms "
            "| vs in-process batch 8 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, result in servers.items():
            if "skipped" in result:
                skipped.append(f"- server {key}: skipped: {result['skipped']}")
                continue
            for row in result["rows"]:
                share = row.get("share_of_batch8")
                lines.append(
                    f"| {result['width']} | {result['runtime']} | {row['clients']} | {row['requests']} | "
                    f"{row['errors']} | {row['requests_per_s']:.1f} | {row['median_ms']:.1f} | "
                    f"{row['p99_ms']:.1f} | {'-' if share is None else f'{100 * share:.0f} %'} |"
                )
    if skipped:
        lines += ["", *skipped]
    return "\n".join(lines)


def fastest_ratio(report: dict[str, Any]) -> dict[str, Any] | None:
    """The fastest runtime at the authors' width, batch 1, against the authors' median per image."""
    authors = report.get("authors") or {}
    entry = report["widths"].get("authors")
    if "median_ms" not in authors or entry is None:
        return None
    candidates = [
        (row["median_ms"], runtime, row)
        for runtime, result in entry["runtimes"].items()
        for row in result.get("rows", [])
        if row["batch"] == 1
    ]
    if not candidates:
        return None
    median, runtime, row = min(candidates, key=lambda item: item[0])
    return {
        "runtime": runtime,
        "median_ms": median,
        "p99_over_median": row["p99_over_median"],
        "speedup": authors["median_ms"] / median,
    }


def batch8_share(report: dict[str, Any], width: str, runtime: str, requests_per_s: float) -> float | None:
    rows = report["widths"][width]["runtimes"].get(runtime, {}).get("rows", [])
    batch8 = [row["images_per_s"] for row in rows if row["batch"] == 8]
    return requests_per_s / batch8[0] if batch8 else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    widths = comma_list(args.widths, tuple(WIDTHS), "--widths")
    runtimes = comma_list(args.runtimes, RUNTIME_NAMES, "--runtimes")
    server_runtimes = comma_list(args.server_runtimes or args.runtimes, RUNTIME_NAMES, "--server-runtimes")
    args.batch_sizes = [int(size) for size in comma_list(args.batch_sizes, None, "--batch-sizes")]
    args.client_counts = [int(count) for count in comma_list(args.clients, None, "--clients")]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.server and not (REPO_ROOT / "src" / "onenip_pl" / "serve.py").exists():
        raise SystemExit("--server: onenip_pl.serve is not in this checkout yet; run without --server")
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "load_before": load_average(),
        "widths": {},
    }
    with tempfile.TemporaryDirectory(prefix="onenip_latency_") as folder:
        scratch = Path(folder)
        for width in widths:
            prepared = prepare_width(width, args, scratch)
            entry = {**{k: v for k, v in prepared.items() if k != "pngs"}, "runtimes": {}}
            report["widths"][width] = entry
            for runtime in runtimes:
                reason = runtime_unavailable(runtime, args.device)
                if reason:
                    print(f"{width} / {runtime}: skipped: {reason}", flush=True)
                    entry["runtimes"][runtime] = {"skipped": reason}
                    continue
                settings = {
                    **prepared,
                    "runtime": runtime,
                    "device": args.device,
                    "precision": args.precision,
                    "threads": args.threads,
                    "batch_sizes": args.batch_sizes,
                    "images": args.images,
                    "warmup": args.warmup,
                }
                entry["runtimes"][runtime] = run_isolated(runtime_phase, settings)
                print(f"{width} / {runtime}: {entry['runtimes'][runtime]['rows']}", flush=True)
        if not args.no_authors:
            report["authors"] = authors_phase(args)
            report["ratio"] = fastest_ratio(report)
        if args.server:
            report["server"] = {}
            for width in widths:
                prepared = {"width": width, **report["widths"][width]}
                prepared["pngs"] = sorted(str(p) for p in (scratch / width).glob("*.png"))
                for runtime in server_runtimes:
                    key = f"{width}/{runtime}"
                    reason = runtime_unavailable(runtime, args.device)
                    if reason:
                        report["server"][key] = {"width": width, "runtime": runtime, "skipped": reason}
                        continue
                    result = server_phase(prepared, runtime, args, scratch)
                    for row in result["rows"]:
                        row["share_of_batch8"] = batch8_share(report, width, runtime, row["requests_per_s"])
                    report["server"][key] = {"width": width, "runtime": runtime, **result}
    report["load_after"] = load_average()
    table = format_tables(report)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        args.json.with_suffix(".md").write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
