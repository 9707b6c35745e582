"""Member indexes of shards at a URL, built at start-up without downloading the shards.

catdog-prep uploads each shard's member index (``train-000000.idx.json``) beside it, recording the shard's size and
sha256. When those are the ones _info.json records, the index describes exactly the bytes the shard cache will
accept (it verifies every download against that sha256), so it is used as it is: one small GET per shard, in
parallel, then kept in the cache for the next start. A shard without such an index is downloaded into the cache
now and its headers scanned, as a local shard without one is.

At start-up a shard that is missing counts as corrupt, as a missing local file does; a denied key or an unreachable
store is one line (``InfoError``) naming the URL and what to fix.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from data_prep import storage
from data_prep.info import DatasetInfo, InfoError
from data_prep.storage import NOT_FOUND, Location, StorageError
from data_prep.tarformat import INDEX_FORMAT, INDEX_SUFFIX, INDEX_VERSION, Member
from train.data.reader import ShardIndex, index_shard, make_index
from train.data.shard_cache import RemoteShard, ShardCache, ShardMismatch

INDEX_THREADS = 16  # concurrent index reads: ~5 ms each is latency, not bandwidth

# (URL, its _info.json record) -> index: a run reads _info.json once, so a shard's index is built once per process.
_MEMO: dict[tuple[str, str], ShardIndex] = {}


def index_split(info: DatasetInfo, split: str, cache: ShardCache | None) -> list[ShardIndex]:
    """The member index of every shard of ``split``, local or remote."""
    paths = info.shard_paths(split)
    if not info.is_remote:
        return [index_shard(p) for p in paths]
    assert cache is not None, "shards at a URL need a shard cache"
    recorded = info.raw.get("shards") if isinstance(info.raw.get("shards"), dict) else {}
    keys = [(str(p), json.dumps(recorded.get(p.name), sort_keys=True)) for p in paths]
    todo = [(p, k) for p, k in zip(paths, keys, strict=True) if k not in _MEMO]
    if todo:  # threads, all joined before any DataLoader worker is forked from this process
        with ThreadPoolExecutor(min(INDEX_THREADS, len(todo)), thread_name_prefix="catdog-index") as pool:
            built = list(pool.map(lambda t: _index_remote(t[0], recorded.get(t[0].name), cache), todo))
        for (_, key), index in zip(todo, built, strict=True):
            if not index.error:  # a failure is looked at again by the next pass
                _MEMO[key] = index
        found = dict(zip((k for _, k in todo), built, strict=True))
        return [_MEMO.get(k) or found[k] for k in keys]
    return [_MEMO[k] for k in keys]


def _index_remote(loc: Location, recorded: object, cache: ShardCache) -> ShardIndex:
    try:
        shard = remote_shard(loc, recorded)
        members = _uploaded_index(shard, cache)
        if members is not None:
            index = replace(make_index(loc, members, "", "index"), remote=shard)
        else:
            index = _scan_copy(shard, cache)
    except ShardMismatch as e:
        return make_index(loc, [], str(e), "scan")
    except StorageError as e:
        if e.kind == NOT_FOUND:
            return make_index(loc, [], f"cannot open shard: {e}", "scan")
        raise InfoError(str(e)) from None
    return index


def remote_shard(loc: Location, recorded: object) -> RemoteShard:
    """The object at ``loc`` as _info.json records it (size, sha256); else as the store describes it (one HEAD)."""
    if isinstance(recorded, dict) and isinstance(recorded.get("bytes"), int) and _is_sha256(recorded.get("sha256")):
        return RemoteShard(loc, recorded["bytes"], recorded["sha256"])
    st = storage.stat(loc)
    return RemoteShard(loc, st.size, st.sha256 if _is_sha256(st.sha256) else None, st.etag)


def _is_sha256(value: object) -> bool:
    """A sha256 hex digest (it names a file in the cache: nothing else may)."""
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _uploaded_index(shard: RemoteShard, cache: ShardCache) -> list[Member] | None:
    """The shard's member index (from the cache, else its sidecar object) when it describes this exact shard."""
    if not shard.sha256:
        return None  # nothing ties a sidecar to the bytes: scan the copy
    data = cache.read_index(shard)
    members = _members(data, shard) if data is not None else None
    if members is not None:
        return members
    sidecar = shard.url.with_name(shard.url.name.removesuffix(".tar") + INDEX_SUFFIX)
    try:
        data = storage.read_bytes(sidecar)
    except StorageError as e:
        if e.kind == NOT_FOUND:
            return None
        raise
    members = _members(data, shard)
    if members is not None:
        cache.keep_index(shard, data)
    return members


def _members(data: bytes, shard: RemoteShard) -> list[Member] | None:
    try:
        raw = json.loads(data)
        if raw.get("format") != INDEX_FORMAT or raw.get("version") != INDEX_VERSION:
            return None
        if raw.get("tar_bytes") != shard.size or raw.get("tar_sha256") != shard.sha256:
            return None  # an index of other bytes (a rewritten shard): not this one's
        members = [(str(n), int(o), int(s)) for n, o, s in raw["members"]]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if any(o < 0 or s < 0 or o + s > shard.size for _, o, s in members):
        return None
    return members


def _scan_copy(shard: RemoteShard, cache: ShardCache) -> ShardIndex:
    """Download the shard into the cache (once per node) and index the copy, holding it against eviction."""
    with cache.held(shard) as path:
        os.close(cache.open(shard))
        index = index_shard(path)
    return replace(index, path=shard.url, remote=shard)


def split_bytes(info: DatasetInfo, splits: list[str]) -> int | None:
    """Bytes of the shards of ``splits`` as _info.json records them; None when it does not record them all."""
    recorded = info.raw.get("shards") if isinstance(info.raw.get("shards"), dict) else {}
    total = 0
    for name in dict.fromkeys(f for s in splits if s in info.splits for f in info.splits[s].filenames):
        size = recorded.get(name, {}).get("bytes") if isinstance(recorded.get(name), dict) else None
        if not isinstance(size, int):
            return None
        total += size
    return total
