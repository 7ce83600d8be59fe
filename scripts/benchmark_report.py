"""Time report.html's writer on N synthetic test rows and measure what it writes.

The rows go through the same code as a test run's report (``RunRows.add_test_batch`` per batch, then
``write_review_page``): smooth random textures with grain at the test resolution, maps made like
OneNIP's (a 14x14 grid upsampled) with a bright square on the defective images, their masks, spread
over a number of categories, seeded. Reported per repeat: the time for the pictures, for the page,
their sum, the page's size and the whole report's size on disk; then the median and the range over
repeats. Run it alone on the machine (other work skews the timings).

Example::

    python scripts/benchmark_report.py --rows 1000 --repeats 3
    python scripts/benchmark_report.py --rows 10000 --image-size 256 --categories 15 --json report_bench.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from onenip_pl.review import RunRows, write_review_page


def synthetic_batches(rows: int, image_size: int, categories: int, batch_size: int, seed: int):
    """Batches of (images, masks, labels, paths, categories, maps, scores), a third of them defective."""
    generator = torch.Generator().manual_seed(seed)
    names = [f"category_{index:02d}" for index in range(categories)]
    for start in range(0, rows, batch_size):
        count = min(batch_size, rows - start)
        labels = [int(index % 3 == 0) for index in range(start, start + count)]
        # smooth textures with a little grain, which JPEG compresses as it does photographs of parts
        coarse = torch.rand(count, 3, 8, 8, generator=generator)
        texture = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
        grain = 0.05 * torch.randn(count, 3, image_size, image_size, generator=generator)
        images = (texture + grain).clamp(0, 1).mul(255).round().to(torch.uint8)
        # like OneNIP's maps: a coarse feature-distance grid upsampled bilinearly
        grid = torch.rand(count, 1, 14, 14, generator=generator)
        maps = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=True)
        masks = torch.zeros(count, image_size, image_size, dtype=torch.bool)
        quarter = image_size // 4
        for i, label in enumerate(labels):
            if label:
                masks[i, quarter : 2 * quarter, quarter : 2 * quarter] = True
                maps[i, 0, quarter : 2 * quarter, quarter : 2 * quarter] += 1.0
        scores = maps.flatten(1).amax(dim=1)
        category = [names[(start + i) % categories] for i in range(count)]
        defect = ["crack" if label else "good" for label in labels]
        paths = [
            f"/data/{c}/test/{d}/{start + i:05d}.png"
            for i, (c, d) in enumerate(zip(category, defect, strict=True))
        ]
        yield images, masks, labels, paths, category, maps, scores


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def run_once(args: argparse.Namespace, run_dir: Path) -> dict[str, float]:
    rows = RunRows(run_dir)
    for batch in synthetic_batches(args.rows, args.image_size, args.categories, args.batch_size, args.seed):
        rows.add_test_batch(*batch, lambda category: (1.2, 1.5))
    start = time.perf_counter()
    page = write_review_page(rows.rows, run_dir, title="benchmark", labelled=True)
    page_seconds = time.perf_counter() - start
    return {
        "pictures_s": rows.seconds,
        "page_s": page_seconds,
        "total_s": rows.seconds + page_seconds,
        "page_MB": page.stat().st_size / 1e6,
        "report_MB": (directory_bytes(run_dir / "report") + page.stat().st_size) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--image-size", type=int, default=256, help="test resolution in px (default 256)")
    parser.add_argument("--categories", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = []
    for repeat in range(args.repeats):
        run_dir = Path(tempfile.mkdtemp(prefix="benchmark_report_"))
        try:
            runs.append(run_once(args, run_dir))
        finally:
            shutil.rmtree(run_dir)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{key} {value:.3f}" for key, value in runs[-1].items()))
    summary = {
        key: {
            "median": statistics.median(run[key] for run in runs),
            "min": min(run[key] for run in runs),
            "max": max(run[key] for run in runs),
        }
        for key in runs[0]
    }
    print(
        f"{args.rows} rows at {args.image_size} px in {args.categories} categories, {args.repeats} repeats:"
    )
    for key, stats in summary.items():
        print(f"  {key:<11} median {stats['median']:.3f}  range {stats['min']:.3f}-{stats['max']:.3f}")
    per_row_ms = 1000 * summary["total_s"]["median"] / args.rows
    print(f"  {per_row_ms:.2f} ms and {1000 * summary['report_MB']['median'] / args.rows:.1f} kB per row")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"settings": vars(args) | {"json": str(args.json)}, "summary": summary}, indent=2)
        )


if __name__ == "__main__":
    main()
