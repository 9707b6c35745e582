"""``https://`` (and ``http://``) objects, read-only: GET, ranged GET (``Range: bytes=a-b``), HEAD. A web server
cannot be listed, so datasets there are addressed through their ``_info.json``.

urllib3 (already under botocore) rather than a second HTTP stack; one PoolManager per process, for the same reason
as the S3 clients: pooled sockets must not be shared with a forked child. Redirects are followed, TLS is verified
(SSL_CERT_FILE / the system's store); a ``user:password@`` in the URL is sent as HTTP basic auth and never printed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import unquote

import urllib3
from urllib3.exceptions import HTTPError as URLLib3Error
from urllib3.exceptions import MaxRetryError, SSLError

from data_prep.storage.errors import (
    CONFIG,
    DENIED,
    FAILED,
    NOT_FOUND,
    UNSUPPORTED,
    RetryPolicy,
    StorageError,
    Transient,
    add_secret,
    mark_reached,
    with_retries,
    write_local,
)
from data_prep.storage.urls import Location

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 1 << 20
UNREACHABLE_HINT = "check the URL's host and port, and that the server is up"

_lock = threading.Lock()
_pool: tuple[int, urllib3.PoolManager] | None = None


def pool() -> urllib3.PoolManager:
    """This process's connection pool (a fresh one after fork)."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            policy = RetryPolicy.from_env()
            timeout = urllib3.Timeout(connect=policy.connect_timeout_s, read=policy.read_timeout_s)
            # redirects followed (a mirror's CDN), nothing else retried here: with_retries does that, with a budget
            retries = urllib3.Retry(total=5, connect=0, read=0, status=0, other=0, redirect=5)
            _pool = (os.getpid(), urllib3.PoolManager(maxsize=16, timeout=timeout, retries=retries))
        return _pool[1]


def _split(loc: Location) -> tuple[str, str, dict[str, str]]:
    """(request URL without credentials, endpoint for messages, auth headers)."""
    host, headers = loc.root, {}
    if "@" in host:
        userinfo, host = host.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        add_secret(unquote(password))
        headers = urllib3.make_headers(basic_auth=f"{unquote(user)}:{unquote(password)}")
    return f"{loc.scheme}://{host}/{loc.key}", f"{loc.scheme}://{host}", headers


def _request(loc: Location, method: str, headers: dict[str, str], *, stream: bool = False):
    """One request; raises Transient or StorageError for anything but 200/206 (416 is returned to the caller)."""
    url, endpoint, auth = _split(loc)
    try:
        # identity: a compressed answer would not be the byte ranges asked for
        headers = {**auth, "Accept-Encoding": "identity", **headers}
        r = pool().request(method, url, headers=headers, preload_content=not stream, redirect=True)
    except (URLLib3Error, OSError) as e:  # refused, DNS, reset, timeout: no answer
        cause = e.reason if isinstance(e, MaxRetryError) and e.reason is not None else e
        if isinstance(cause, SSLError):
            msg = "TLS failed (certificate or protocol): check http:// vs https://, and SSL_CERT_FILE"
            raise StorageError(str(loc), msg, CONFIG) from None
        raise Transient(type(cause).__name__, answered=False) from None
    mark_reached(endpoint)
    if r.status in (200, 206, 416):
        return r
    r.release_conn()
    if r.status in RETRY_STATUS or r.status >= 500:
        raise Transient(f"HTTP {r.status}", answered=True)
    if r.status in (404, 410):
        raise StorageError(str(loc), f"not found (HTTP {r.status}) at {endpoint}: check the URL", NOT_FOUND)
    if r.status in (401, 403):
        msg = f"access denied (HTTP {r.status}) by {endpoint}: the server wants credentials or refuses this URL"
        raise StorageError(str(loc), msg, DENIED)
    raise StorageError(str(loc), f"{endpoint} answered HTTP {r.status}: check the URL", FAILED)


def _call(loc: Location, what: str, fn):
    endpoint = _split(loc)[1]
    policy = RetryPolicy.from_env()
    return with_retries(
        fn, url=str(loc), endpoint=endpoint, policy=policy, unreachable_hint=UNREACHABLE_HINT, what=what
    )


def head(loc: Location) -> dict:
    def fn():
        r = _request(loc, "HEAD", {})
        size = r.headers.get("Content-Length")
        if r.status == 416 or size is None:
            raise StorageError(str(loc), "the server gives no size for it (no Content-Length)", FAILED)
        # S3 gateways (a public bucket over https) send the sha256 catdog stored with the object
        return {"size": int(size), "etag": r.headers.get("ETag", ""), "sha256": r.headers.get("x-amz-meta-sha256")}

    return _call(loc, "head", fn)


def get(loc: Location, start: int = 0, size: int | None = None) -> bytes:
    if size is not None and size <= 0:
        return b""
    ranged = size is not None or start > 0
    headers = (
        {"Range": f"bytes={start}-{start + size - 1}" if size is not None else f"bytes={start}-"} if ranged else {}
    )

    def fn():
        r = _request(loc, "GET", headers, stream=True)
        try:
            if r.status == 416:
                return b""
            if ranged and r.status != 206:
                # A server that ignores Range sends the whole object: reading it for every member would be ruinous.
                msg = "the server ignores HTTP Range requests; serve the shards from one that supports them"
                raise StorageError(str(loc), msg, UNSUPPORTED)
            data = r.read(decode_content=False)
            expected = r.headers.get("Content-Length")
            if expected is not None and len(data) != int(expected):
                raise Transient(f"body cut at {len(data)} of {expected} bytes", answered=True)
            return data
        except (URLLib3Error, OSError) as e:
            raise Transient(type(e).__name__, answered=True) from None
        finally:
            r.release_conn()

    return _call(loc, "read", fn)


def get_file(loc: Location, dest: Path) -> int:
    """Download into ``dest``; a cut transfer resumes where it stopped (Range, If-Range on the ETag)."""
    first = head(loc)
    total, etag = first["size"], first["etag"]
    with open(dest, "wb") as f:

        def fn():
            done = f.tell()
            if done >= total:
                return total
            headers = {}
            if done:  # resume; If-Range: an object changed meanwhile comes back whole (200), not as a mixed tail
                headers = {"Range": f"bytes={done}-{total - 1}", **({"If-Range": etag} if etag else {})}
            r = _request(loc, "GET", headers, stream=True)
            try:
                if r.status != (206 if done else 200):
                    msg = "the object changed while it was read, or the server ignores Range: retry"
                    raise StorageError(str(loc), msg, FAILED)
                for chunk in r.stream(CHUNK, decode_content=False):
                    write_local(f, chunk, dest)
            except (URLLib3Error, OSError) as e:
                raise Transient(type(e).__name__, answered=True) from None
            finally:
                r.release_conn()
            if f.tell() < total:
                raise Transient(f"body cut at {f.tell()} of {total} bytes", answered=True)
            return f.tell()

        got = _call(loc, "download", fn)
        f.flush()
        os.fsync(f.fileno())
    return got
