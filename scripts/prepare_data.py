"""Download, verify, unpack and validate MVTec AD, VisA, BTAD or the DTD textures.

    python scripts/prepare_data.py mvtec --root data/mvtec
    python scripts/prepare_data.py visa --root data/visa --archive ~/Downloads/VisA_20220922.tar
    python scripts/prepare_data.py dtd --root data/dtd

Downloads resume where they stopped (HTTP Range) when the same command is run again. Each archive is
checked against its size and SHA-256 where those are known (taken from the data sets' published
tooling; see SOURCES); the tree is unpacked into --root so that --root is the data.root to use, and
finally every image is checked with onenip_pl.data.check. Download addresses change from time to
time: pass --url with the current one from the data set's page, or download in a browser (MVTec asks
for a form) and pass --archive. For MVTec + VisA + BTAD as one data set, prepare each into its own
folder and set data.root to the three of them.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from rich.console import Console

from onenip_pl.data.check import check_dataset, check_dtd
from onenip_pl.errors import DataError

CHUNK = 1 << 20
ATTEMPTS = 5
DOWNLOAD_DIR = ".download"
UNPACK_DIR = ".unpack"


@dataclass(frozen=True)
class Source:
    """Where one data set is published and how its archive is recognised."""

    title: str
    archive: str
    url: str
    page: str
    license: str
    sha256: str | None = None
    size: int | None = None


SOURCES: dict[str, Source] = {
    "mvtec": Source(
        title="MVTec AD",
        archive="mvtec_anomaly_detection.tar.xz",
        url="https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
        "420938113-1629960298/mvtec_anomaly_detection.tar.xz",
        page="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        license="CC BY-NC-SA 4.0",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        size=5_264_982_680,
    ),
    "visa": Source(
        title="VisA",
        archive="VisA_20220922.tar",
        url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        page="https://github.com/amazon-science/spot-diff",
        license="CC BY 4.0",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
    ),
    "btad": Source(
        title="BTAD",
        archive="btad.zip",
        url="https://avires.dimi.uniud.it/papers/btad/btad.zip",
        page="https://github.com/pankajmishra000/VT-ADL",
        license="CC BY-SA 4.0",
        sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
    ),
    "dtd": Source(
        title="DTD (Describable Textures Dataset)",
        archive="dtd-r1.0.1.tar.gz",
        url="https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
        page="https://www.robots.ox.ac.uk/~vgg/data/dtd/",
        license="research use (see the page)",
        sha256="e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
    ),
}


def is_tree_root(name: str, directory: Path) -> bool:
    """Whether `directory` is the top of data set `name` as its readers expect it."""
    if name == "visa":
        return (directory / "split_csv" / "1cls.csv").is_file()
    if name == "dtd":
        return (directory / "images").is_dir()
    normal = "ok" if name == "btad" else "good"
    return any((child / "train" / normal).is_dir() for child in _subdirectories(directory))


def _subdirectories(directory: Path) -> list[Path]:
    return sorted(child for child in directory.iterdir() if child.is_dir() and not child.name.startswith("."))


def locate_tree(name: str, unpacked: Path, max_depth: int = 3) -> Path:
    """The shallowest folder under `unpacked` that is the top of data set `name`."""
    level = [unpacked]
    for _ in range(max_depth + 1):
        for directory in level:
            if is_tree_root(name, directory):
                return directory
        level = [child for directory in level for child in _subdirectories(directory)]
    raise DataError(
        f"the unpacked archive in {unpacked} does not look like {SOURCES[name].title}: no folder in it "
        "has the expected layout (see spec/datasets.md); is it the right archive?"
    )


def download(url: str, target: Path, *, size: int | None = None, say: Callable[[str], None] = print) -> Path:
    """Fetch `url` into `target`, resuming a partial `<target>.part` left by an earlier attempt."""
    if target.is_file() and (size is None or target.stat().st_size == size):
        say(f"{target} already downloaded")
        return target
    partial = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _fetch(url, partial, size, say)
            break
        except (OSError, http.client.HTTPException) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code < 500 and err.code != 429:
                raise DataError(_unreachable(url, target, f"HTTP {err.code} {err.reason}")) from err
            if attempt == ATTEMPTS:
                raise DataError(_unreachable(url, target, str(err))) from err
            say(f"transfer interrupted ({err}); resuming in {2 * attempt} s")
            time.sleep(2 * attempt)
    received = partial.stat().st_size
    if size is not None and received != size:
        raise DataError(
            f"{partial} has {received} bytes but {target.name} has {size}; run the same command again to "
            "resume, or delete the .part file to start over"
        )
    partial.replace(target)
    return target


def _fetch(url: str, partial: Path, size: int | None, say: Callable[[str], None]) -> None:
    """One request from where `partial` ends; raises ConnectionError when the reply stops short."""
    offset = partial.stat().st_size if partial.exists() else 0
    if size is not None and offset == size:
        return
    request = urllib.request.Request(url, headers={"User-Agent": "onenip-pl prepare_data"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return
        raise
    with response:
        resumed = offset > 0 and response.status == 206 and _range_start(response) == offset
        if offset and not resumed:
            say("the server does not resume transfers; starting from the beginning")
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size
        say(f"downloading {url} -> {partial.name} from byte {offset}" + (f" of {total}" if total else ""))
        with partial.open("ab" if resumed else "wb") as out:
            _copy(response, out, offset, total, say)
    if total is not None and partial.stat().st_size < total:
        raise ConnectionError(f"connection closed at byte {partial.stat().st_size} of {total}")


def _range_start(response: http.client.HTTPResponse) -> int | None:
    """First byte of a 206 reply, from ``Content-Range: bytes START-END/TOTAL``."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _copy(
    response: BinaryIO, out: BinaryIO, offset: int, total: int | None, say: Callable[[str], None]
) -> None:
    received, reported = offset, offset
    while chunk := response.read(CHUNK):
        out.write(chunk)
        received += len(chunk)
        if received - reported >= 256 * CHUNK:
            reported = received
            say(f"  {received / 1e6:,.0f} MB" + (f" of {total / 1e6:,.0f} MB" if total else ""))


def _unreachable(url: str, target: Path, reason: str) -> str:
    return (
        f"cannot download {url}: {reason}. The address may have moved: pass --url with the current one, "
        f"or download {target.name} in a browser and run again with --archive PATH."
    )


def verify_archive(
    archive: Path, *, size: int | None, sha256: str | None, say: Callable[[str], None] = print
) -> None:
    """Compare the archive's size and SHA-256 with the expected ones, where they are known."""
    if size is not None and archive.stat().st_size != size:
        raise DataError(
            f"{archive} has {archive.stat().st_size:,} bytes but the official archive has {size:,}: it is "
            "incomplete or a different release (use --skip-checksum to accept it)."
        )
    if sha256 is None:
        say(f"no published checksum known for {archive.name}; relying on the tree check instead")
        return
    say(f"computing the SHA-256 of {archive} ...")
    digest = hashlib.sha256()
    with archive.open("rb") as handle:
        while block := handle.read(16 * CHUNK):
            digest.update(block)
    if digest.hexdigest() != sha256.lower():
        raise DataError(
            f"SHA-256 of {archive} is {digest.hexdigest()}, expected {sha256.lower()}: the file is damaged "
            "or a re-packed release. Download it again, or pass --skip-checksum if you trust it."
        )
    say("checksum matches")


def unpack(archive: Path, destination: Path, say: Callable[[str], None] = print) -> None:
    """Unpack a .zip or a (compressed) tar into `destination`, refusing members that would escape it."""
    destination.mkdir(parents=True, exist_ok=True)
    say(f"unpacking {archive} ...")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            for name in handle.namelist():
                _check_member_name(name, archive)
            handle.extractall(destination)
        return
    try:
        handle = tarfile.open(archive)
    except tarfile.TarError as err:
        raise DataError(
            f"{archive} is neither a zip nor a tar archive (.tar, .tar.gz, .tar.xz): {err}"
        ) from err
    with handle:
        for member in handle:
            _check_member_name(member.name, archive)
            if not (member.isfile() or member.isdir()):
                raise DataError(
                    f"{archive} holds {member.name}, a link or device; data-set archives hold none"
                )
            if hasattr(tarfile, "data_filter"):
                handle.extract(member, destination, filter="data")
            else:
                handle.extract(member, destination)


def _check_member_name(name: str, archive: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"{archive} holds {name!r}, which points outside the destination; refusing to unpack")


def install_tree(tree: Path, root: Path) -> None:
    """Move the unpacked data set's top-level entries into `root`, which becomes data.root."""
    entries = [entry for entry in tree.iterdir()]
    clashes = [str(root / entry.name) for entry in entries if (root / entry.name).exists()]
    if clashes:
        raise DataError(f"{root} already holds {clashes}; remove them or choose another --root")
    for entry in entries:
        shutil.move(str(entry), str(root / entry.name))


def validate(name: str, root: Path, decode: str, console: Console) -> bool:
    """Run the data check on the installed tree and print what it found."""
    if name == "dtd":
        report = check_dtd(root, decode=decode, raise_on_problems=False)
        console.print(
            f"DTD at {root}: {report.classes} classes, {report.images} images", markup=False, soft_wrap=True
        )
        problems, notes = report.problems, report.notes
    else:
        data_report = check_dataset(name, root, decode=decode, raise_on_problems=False)
        console.print(data_report.table())
        problems, notes = data_report.problems, data_report.notes
    for note in notes:
        console.print(f"note: {note}", style="yellow", markup=False, soft_wrap=True)
    for problem in problems:
        console.print(f"problem: {problem}", style="red", markup=False, soft_wrap=True)
    return not problems


def prepare(args: argparse.Namespace, console: Console) -> int:
    name, root = args.name, Path(args.root).expanduser().resolve()
    source = SOURCES[name]

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    root.mkdir(parents=True, exist_ok=True)
    if is_tree_root(name, root):
        say(f"{source.title} is already at {root}; checking it (delete it to prepare it afresh)")
        return 0 if validate(name, root, args.decode, console) else 1
    downloaded = args.archive is None
    archive = Path(args.archive).expanduser() if args.archive else root / DOWNLOAD_DIR / source.archive
    if downloaded:
        say(f"{source.title} ({source.license}); terms and current links: {source.page}")
        official_size = source.size if not (args.skip_checksum or args.sha256 or args.url) else None
        download(args.url or source.url, archive, size=official_size, say=say)
    elif not archive.is_file():
        raise DataError(f"--archive {archive} is not a file")
    if not args.skip_checksum:
        size, sha256 = (None, args.sha256) if args.sha256 else (source.size, source.sha256)
        try:
            verify_archive(archive, size=size, sha256=sha256, say=say)
        except DataError as err:
            if not downloaded:
                raise
            raise DataError(
                f"{err} To download afresh, delete {archive} and run the command again; to use it anyway, "
                f"run again with --archive {archive} --skip-checksum."
            ) from err
    staging = root / UNPACK_DIR
    shutil.rmtree(staging, ignore_errors=True)
    unpack(archive, staging, say)
    install_tree(locate_tree(name, staging), root)
    shutil.rmtree(staging)
    say(f"{source.title} unpacked into {root}; use data.root={root}")
    ok = validate(name, root, args.decode, console)
    if ok and downloaded and not args.keep_archive:
        archive.unlink()
        shutil.rmtree(root / DOWNLOAD_DIR, ignore_errors=True)
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download, verify, unpack and check a data set so that --root can be used as data.root."
    )
    parser.add_argument("name", choices=sorted(SOURCES), help="which data set")
    parser.add_argument("--root", required=True, help="folder the data set goes into (becomes data.root)")
    parser.add_argument("--archive", help="use this already-downloaded archive instead of downloading")
    parser.add_argument("--url", help="download from this address instead of the built-in one")
    parser.add_argument("--sha256", help="expected SHA-256 of the archive, replacing the built-in one")
    parser.add_argument(
        "--skip-checksum", action="store_true", help="accept the archive without size/SHA-256"
    )
    parser.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive afterwards")
    parser.add_argument(
        "--decode", choices=("header", "verify", "full"), default="verify", help="how deeply to check images"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    try:
        return prepare(args, console)
    except DataError as err:
        console.print(str(err), style="red", markup=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
