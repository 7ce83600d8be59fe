"""Check a data set before training: `python -m onenip_pl.check experiment=visa data.root=DIR`.

Composes the training config with the given overrides, reads its data set (``data.dataset``,
``data.root``, ``data.categories``, ``data.reader_options``) and prints the counts found beside the
official ones, every problem that must be fixed, and the notes. Exit status 0 when the set is clean.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from omegaconf import OmegaConf
from rich.console import Console

from onenip_pl.config import compose
from onenip_pl.data.check import DECODE_LEVELS, check_dataset
from onenip_pl.errors import OneNIPError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m onenip_pl.check",
        description="Check the data set named by the training config (data.dataset, data.root, "
        "data.categories) before training: counts beside the official ones, and every problem found.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=visa data.root=DIR")
    parser.add_argument("--decode", choices=DECODE_LEVELS, default="verify", help="how deeply to read files")
    parser.add_argument(
        "--strict-counts", action="store_true", help="treat counts unlike the official release as problems"
    )
    args = parser.parse_args(argv)
    console = Console()
    try:
        data = compose("train", args.overrides).data
        root, categories, options = (
            OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            for value in (data.root, data.categories, data.reader_options)
        )
        strict = bool(data.get("strict", False))
        console.print(
            f"checking data set {data.dataset} at {root} (decode: {args.decode})",
            markup=False,
            soft_wrap=True,
        )
        # the demo set is written in MVTec AD layout
        report = check_dataset(
            "mvtec" if data.dataset == "demo" else data.dataset,
            root,
            categories,
            decode=args.decode,
            strict_counts=args.strict_counts,
            raise_on_problems=False,
            strict=strict,
            **(options or {}),
        )
    except OneNIPError as err:
        console.print(str(err), style="red", markup=False, soft_wrap=True)
        return 1
    console.print(report.table())
    for kind, paths in (
        ("files that are not images", report.passed_over_files),
        ("directories the layout does not know", report.passed_over_dirs),
    ):
        if paths:
            listing = "\n".join(f"  {path}" for path in paths)
            console.print(
                f"passed over {len(paths)} {kind} (data.strict=true stops on them):\n{listing}",
                style="yellow",
                markup=False,
                soft_wrap=True,
            )
    for note in report.notes:
        console.print(f"note: {note}", style="yellow", markup=False, soft_wrap=True)
    if not report.ok:
        console.print(report.message(), style="red", markup=False, soft_wrap=True)
        return 1
    console.print(f"[green]OK[/]: {report.files_checked} files checked, no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
