"""What an offline W&B run recorded, read back from its ``.wandb`` file (wandb has no public reader of it).

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of records, each
a 7-byte header (crc32 of type + data, uint16 length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) and its data; a
``wandb_internal_pb2.Record`` may span blocks. A block's last < 7 bytes are padding.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    """Every record of a ``.wandb`` file, in order; a bad checksum fails (the reader must not guess)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    pos, parts = HEADER, b""
    while len(data) - pos >= HEADER:
        if BLOCK - pos % BLOCK < HEADER:  # the rest of this block is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero-filled tail: nothing more was written
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += HEADER + length
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


class Session:
    """One session of a run (one ``offline-run-*`` folder): its run record, artifacts, history and summary."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.records = list(records(next(folder.glob("run-*.wandb"))))

    def _of(self, kind: str) -> list:
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def run_id(self) -> str:
        return self._of("run")[0].run_id

    @property
    def artifacts(self) -> list[pb.ArtifactRecord]:
        return self._of("artifact")

    def history_keys(self) -> set[str]:
        return {item.key or "/".join(item.nested_key) for h in self._of("history") for item in h.item}

    def summary(self) -> dict:
        """The run summary's values, the last update of each key winning."""
        out: dict = {}
        for s in self._of("summary"):
            for u in s.update:
                out[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
        return out


def sessions(run_dir: Path) -> list[Session]:
    """The offline W&B sessions under ``run_dir/wandb``, oldest first."""
    return [Session(p) for p in sorted((Path(run_dir) / "wandb").glob("offline-run-*"))]


def files(artifact: pb.ArtifactRecord) -> dict[str, int]:
    """An artifact's files: name -> size."""
    return {entry.path: entry.size for entry in artifact.manifest.contents}


def md5_b64(path: Path) -> str:
    """A file's digest as a W&B manifest writes it (base64 of the MD5)."""
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def check_run_end(session: Session, run_dir: Path, shards: Path) -> tuple[pb.ArtifactRecord, pb.ArtifactRecord]:
    """What a finished run tells W&B (train.run.tracking.log_run_end), checked against the run dir; once per
    session however many ranks ran. Returns the (model, dataset) artifact records."""
    final = json.loads((run_dir / "final_metrics.json").read_text())
    models = [a for a in session.artifacts if a.type == "model"]
    datasets = [a for a in session.artifacts if a.type == "dataset"]
    assert len(models) == 1 and len(datasets) == 1, [(a.type, a.name) for a in session.artifacts]

    # The model: the bundle's files as they are in run.dir/model, named after the run, aliases best and latest,
    # an output of the run.
    model = models[0]
    assert model.name == f"model-{session.run_id}" and {"best", "latest"} <= set(model.aliases), model.aliases
    assert not model.use_after_commit and model.finalize
    bundle = run_dir / "model"
    assert {e.path: (e.size, e.digest) for e in model.manifest.contents} == {
        p.name: (p.stat().st_size, md5_b64(p)) for p in bundle.iterdir()
    }
    assert {"model.safetensors", "model.json"} == set(files(model))
    meta = json.loads(model.metadata)
    assert meta["checkpoint"] == final["best_checkpoint"] and meta["score"] == final[f"best/{meta['monitor']}"]

    # The data: the shards' _info.json, used by the run (W&B records the use when the artifact is committed).
    dataset = datasets[0]
    info = shards / "_info.json"
    assert dataset.use_after_commit and dataset.user_created
    assert {e.path: e.digest for e in dataset.manifest.contents} == {"_info.json": md5_b64(info)}
    data_meta = json.loads(dataset.metadata)
    assert data_meta["dir"] == str(shards.resolve())
    assert data_meta["info_sha256"] == hashlib.sha256(info.read_bytes()).hexdigest()
    assert dataset.name == json.loads(info.read_text())["name"]

    # The summary: every scalar of final_metrics.json under its own name (the history only has final/*); a
    # cached-feature run adds its features/* notes to the file after the end of the run.
    summary = session.summary()
    scalars = {
        k: v for k, v in final.items() if isinstance(v, (int, float, str, bool)) and not k.startswith("features/")
    }
    assert {"best/val/accuracy", "epochs_completed", "best_checkpoint"} <= scalars.keys()
    for key, value in scalars.items():
        assert _same(summary.get(key), value), (key, summary.get(key), value)
    assert "best/val/accuracy" not in session.history_keys()
    return model, dataset
