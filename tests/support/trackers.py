"""Read back what the experiment trackers wrote: a W&B offline run file and an MLflow file store.

wandb 0.31 has no Python reader for its ``run-<id>.wandb`` files any more (the writer moved to
its Go core), so :func:`read_wandb_records` reads the container itself: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0) then LevelDB-log framing (32 KiB blocks; each chunk has a
CRC32C, a little-endian length and a type: 1 full, 2 first, 3 middle, 4 last). Each record is
a ``wandb_internal_pb2.Record`` protobuf, decoded with the installed wandb's own schema.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

WANDB_HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32768
CHUNK_HEADER = 7


def _chunks(data: bytes):
    pos = len(WANDB_HEADER)
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        yield kind, data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length


def read_wandb_records(run_file: Path) -> list:
    """Every protobuf Record of an offline W&B run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data.startswith(WANDB_HEADER), f"{run_file} is not a W&B run file"
    records, pending = [], b""
    for kind, payload in _chunks(data):
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_file: Path) -> list[dict]:
    """The rows passed to ``wandb.log``: ``{key: value}`` with ``_step`` among them."""
    rows = []
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def wandb_config(run_file: Path) -> dict:
    """The run config (the last value of each key)."""
    config = {}
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config
