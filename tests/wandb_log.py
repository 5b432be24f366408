"""Read back what an offline wandb run wrote: its transaction log (`run-<id>.wandb`).

wandb 0.31 has no Python reader; the file is LevelDB's log format (7-byte header, then 32 KiB
blocks of chunks: crc32c 4 bytes, length 2 bytes little-endian, type 1 byte) around protobuf
`Record`s, which wandb ships.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


BLOCK, HEADER, FILE_HEADER = 32768, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pending = FILE_HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            payload = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            payload, pending = pending + chunk, b""
        else:
            break
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def run_config(run_dir: Path) -> dict:
    """The config an offline run logged (run record and later config updates)."""
    (log,) = run_dir.glob("run-*.wandb")
    cfg = {}
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        items = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        for item in items:
            cfg[item.key] = json.loads(item.value_json)
    return {k: (v["value"] if isinstance(v, dict) and set(v) >= {"value"} else v) for k, v in cfg.items()}
