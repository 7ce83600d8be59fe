"""Read back what a real offline W&B run wrote to its `.wandb` transaction log.

wandb 0.31 no longer ships a Python reader for this file, so the tests parse
its framing (a LevelDB-style log of 32 KiB blocks, 7-byte record headers)
and decode each record with W&B's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32768
HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> list[bytes]:
    if not data.startswith(b":W&B"):
        raise ValueError("not a W&B transaction log")
    position, pending, payloads = 7, b"", []
    while position + HEADER.size <= len(data):
        room = BLOCK_SIZE - position % BLOCK_SIZE
        if room < HEADER.size:
            position += room
            continue
        _, length, kind = HEADER.unpack_from(data, position)
        if position + HEADER.size + length > len(data):
            break  # the writer is still appending this record
        chunk = data[position + HEADER.size : position + HEADER.size + length]
        position += HEADER.size + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
        else:
            break
    return payloads


def _records(run_dir: Path, timeout: float = 60.0) -> list:
    """All records of the run, once W&B's writer has flushed the closing `exit` record.

    wandb-core writes the log from a separate process, so `finish()` can return
    a moment before the last records reach the file.
    """
    (log_file,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records, complete = [], True
        for payload in _payloads(log_file.read_bytes()):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(payload)
            except DecodeError:
                # read while the writer was between the header and the end of a record: read again
                complete = False
                break
            records.append(record)
        finished = complete and any(r.WhichOneof("record_type") == "exit" for r in records)
        if finished or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def logged_values(run_dir: Path) -> dict[str, list]:
    """Every value logged to history, by key, in logging order."""
    values: dict[str, list] = {}
    for record in _records(run_dir):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                values.setdefault(_key(item), []).append(json.loads(item.value_json))
    return values


def run_config(run_dir: Path) -> dict:
    """The run's config as logged (keys flattened by W&B's protocol)."""
    config: dict = {}
    for record in _records(run_dir):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[_key(item)] = json.loads(item.value_json)
        if record.WhichOneof("record_type") == "run":
            for item in record.run.config.update:
                config[_key(item)] = json.loads(item.value_json)
    return config
