"""``s3://`` through boto3, any S3-compatible store: endpoint, region and credentials come from boto3's standard
chain (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
AWS_PROFILE, ~/.aws/config and ~/.aws/credentials, instance roles).

Why boto3 (bench/s3_clients.py, measured against SeaweedFS here): obstore's ranged GETs were ~1.5x faster, but a
process forked from one that had used obstore hung on its first request, even with a new store -- and DataLoader
workers are forked from the process that read ``_info.json``; s3fs was slower at everything and needed ~0.5 s for
a forked child's first GET. boto3 also reads profiles and ~/.aws/config itself, which obstore does not.

Clients are per process: a client holds pooled sockets, which a forked child must not share with its parent. The
boto3 Session (parsed service models, ~0.2 s to build) is kept across fork, so a DataLoader worker's first client
costs ~20 ms. botocore's own retries are off: ``with_retries`` retries every operation including the body read
(botocore would not), within a time budget rather than a count.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import botocore.exceptions as bx
from botocore.config import Config
from urllib3.exceptions import HTTPError as URLLib3Error

from data_prep.storage.errors import (
    CONFIG,
    DENIED,
    FAILED,
    NOT_FOUND,
    RetryPolicy,
    StorageError,
    Transient,
    add_secret,
    mark_reached,
    with_retries,
    write_local,
)
from data_prep.storage.urls import Location, redact

# The variables that change which client boto3 builds; a change (a test, a second store) gets a new client.
_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE", "CATDOG_STORAGE_TIMEOUT_S",
)  # fmt: skip
MULTIPART_THRESHOLD = 64 << 20  # larger files go up in parts: a failed part is resent alone
PART_SIZE = 32 << 20
CHUNK = 1 << 20  # download read size
UNREACHABLE_HINT = "check AWS_ENDPOINT_URL (or endpoint_url in the AWS profile) and that the store is up"
CRED_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile named by AWS_PROFILE"
RETRYABLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
    "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
}  # fmt: skip

_lock = threading.Lock()
_sessions: dict[int, boto3.session.Session] = {}  # kept across fork: no sockets in a Session
_clients: dict[int, tuple[object, str]] = {}  # (client, endpoint) of THIS process
_clients_pid = os.getpid()


def _env_key() -> int:
    return hash(tuple(os.environ.get(v) for v in _ENV))


def client(url: str = "s3://") -> tuple[object, str]:
    """This process's S3 client for the current AWS settings, and the endpoint it talks to (for messages);
    ``url`` names the object in a configuration error."""
    global _clients_pid
    key = _env_key()
    with _lock:
        if _clients_pid != os.getpid():  # forked: the parent's clients (and their sockets) are not ours
            _clients.clear()
            _clients_pid = os.getpid()
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = _make_client(key, url)
        return found


def _make_client(key: int, url: str) -> tuple[object, str]:
    policy = RetryPolicy.from_env()
    try:
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = boto3.session.Session()
        creds = session.get_credentials()
        if creds is None:
            raise StorageError(
                url, "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                "naming a profile in ~/.aws/credentials", CONFIG,
            )  # fmt: skip
        frozen = creds.get_frozen_credentials()
        for secret in (frozen.access_key, frozen.secret_key, frozen.token):
            add_secret(secret)
        config = Config(
            retries={"total_max_attempts": 1},  # with_retries does it, body reads included
            connect_timeout=policy.connect_timeout_s,
            read_timeout=policy.read_timeout_s,
            max_pool_connections=16,
        )
        c = session.client("s3", config=config)
    except (bx.ProfileNotFound, bx.PartialCredentialsError, bx.InvalidConfigError, ValueError) as e:
        raise StorageError(
            url, f"the AWS configuration is unusable ({type(e).__name__}: {e}); fix it", CONFIG
        ) from None
    return c, redact(c.meta.endpoint_url)


# ----------------------------------------------------------------------------------------------- errors


def _translate(e: Exception, loc: Location, endpoint: str) -> Exception:
    """A boto3/urllib3 failure as Transient (retry it) or StorageError (tell the user what to fix)."""
    url = str(loc)
    if isinstance(e, bx.ClientError):
        mark_reached(endpoint)  # an HTTP answer: the endpoint exists
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status >= 500 or code in RETRYABLE_CODES:
            return Transient(f"HTTP {status} {code}".strip(), answered=True)
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(url, f"no such object at {endpoint}: check the URL", NOT_FOUND)
        if code == "NoSuchBucket":
            msg = f"bucket {loc.root!r} does not exist at {endpoint}: check the URL's bucket and AWS_ENDPOINT_URL"
            return StorageError(url, msg, NOT_FOUND)
        if code == "InvalidAccessKeyId":
            msg = f"{endpoint} does not know this access key id (InvalidAccessKeyId): {CRED_HINT}, and the endpoint"
            return StorageError(url, msg, DENIED)
        if code == "SignatureDoesNotMatch":
            msg = f"the secret key does not match the access key id (SignatureDoesNotMatch at {endpoint}): {CRED_HINT}"
            return StorageError(url, msg, DENIED)
        if code in ("PreconditionFailed", "412"):
            return StorageError(url, "the object changed while it was read: read it again", FAILED)
        if status == 403 or code in ("AccessDenied", "403", "InvalidToken", "ExpiredToken", "AllAccessDisabled"):
            msg = f"access denied by {endpoint} ({code or status}): {CRED_HINT}, and the key's rights on the bucket"
            return StorageError(url, msg, DENIED)
        return StorageError(
            url, f"{endpoint} answered HTTP {status} {code}: check the URL and AWS_ENDPOINT_URL", FAILED
        )
    if isinstance(e, bx.SSLError):
        msg = f"TLS failed with {endpoint} ({type(e).__name__}): check http:// vs https:// and AWS_CA_BUNDLE"
        return StorageError(url, msg, CONFIG)
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ProxyConnectionError)):
        return Transient(f"{type(e).__name__}", answered=False)
    if isinstance(e, (bx.HTTPClientError, bx.IncompleteReadError, bx.ConnectionError, URLLib3Error, OSError)):
        return Transient(f"{type(e).__name__}", answered=False)
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return StorageError(url, f"no usable AWS credentials ({type(e).__name__}): {CRED_HINT}", CONFIG)
    if isinstance(e, bx.ParamValidationError):
        return StorageError(url, f"not a valid S3 location ({e}); fix the URL", CONFIG)
    if isinstance(e, bx.BotoCoreError):
        return StorageError(url, f"{type(e).__name__} talking to {endpoint}: {e}", FAILED)
    return e


def _call(loc: Location, what: str, fn, policy: RetryPolicy | None = None):
    """``fn(client)`` with retries and translated errors."""
    policy = policy or RetryPolicy.from_env()
    c, endpoint = client(str(loc))

    def once():
        try:
            return fn(c)
        except (bx.BotoCoreError, bx.ClientError, URLLib3Error, OSError) as e:
            raise _translate(e, loc, endpoint) from None

    return with_retries(
        once, url=str(loc), endpoint=endpoint, policy=policy, unreachable_hint=UNREACHABLE_HINT, what=what
    )


# ----------------------------------------------------------------------------------------------- operations


def head(loc: Location) -> dict:
    """size, etag and (when catdog wrote it) sha256 of one object."""

    def fn(c):
        r = c.head_object(Bucket=loc.root, Key=loc.key)
        return {
            "size": int(r["ContentLength"]),
            "etag": r.get("ETag", ""),
            "sha256": r.get("Metadata", {}).get("sha256"),
        }

    return _call(loc, "head", fn)


def get(loc: Location, start: int = 0, size: int | None = None) -> bytes:
    """The object's bytes, or ``size`` bytes from ``start`` (fewer at the end of the object, b"" past it)."""
    if size is not None and size <= 0:
        return b""

    def fn(c):
        args = {"Bucket": loc.root, "Key": loc.key}
        if size is not None or start:
            args["Range"] = f"bytes={start}-{start + size - 1}" if size is not None else f"bytes={start}-"
        try:
            r = c.get_object(**args)
        except bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # starts past the end: an empty read, as pread gives
            raise
        return r["Body"].read()  # StreamingBody checks Content-Length: a cut body raises, and is retried

    return _call(loc, "read", fn)


def list_dir(loc: Location) -> Iterator[tuple[str, int]]:
    """(name, size) of each object directly under the prefix (not in sub-folders)."""
    prefix = loc.key.rstrip("/") + "/" if loc.key.strip("/") else ""

    def page(token: str | None):
        def fn(c):
            args = {"Bucket": loc.root, "Prefix": prefix, "Delimiter": "/"}
            if token:
                args["ContinuationToken"] = token
            return c.list_objects_v2(**args)

        return _call(loc, "list", fn)

    token = None
    while True:
        r = page(token)
        for o in r.get("Contents", []):
            name = o["Key"][len(prefix) :]
            if name:
                yield name, int(o["Size"])
        token = r.get("NextContinuationToken")
        if not r.get("IsTruncated") or not token:
            return


def put(loc: Location, data: bytes, sha256: str | None = None) -> None:
    """One PUT: S3 makes the object visible only once all of it has arrived (see tests/test_storage_s3.py)."""
    meta = {"sha256": sha256 or hashlib.sha256(data).hexdigest()}
    _call(loc, "write", lambda c: c.put_object(Bucket=loc.root, Key=loc.key, Body=data, Metadata=meta))


def put_file(loc: Location, path: Path, sha256: str | None = None) -> None:
    """Upload a local file; up to MULTIPART_THRESHOLD in one PUT, larger in parts completed at the end (the object
    appears only when CompleteMultipartUpload succeeds; a failure aborts the upload)."""
    size = path.stat().st_size
    if size <= MULTIPART_THRESHOLD:
        put(loc, path.read_bytes(), sha256)
        return
    target = {"Bucket": loc.root, "Key": loc.key}
    meta = {"sha256": sha256 or _file_sha256(path)}
    upload = _call(loc, "write", lambda c: c.create_multipart_upload(**target, Metadata=meta)["UploadId"])
    try:
        parts = []
        with open(path, "rb") as f:
            for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
                body = os.pread(f.fileno(), PART_SIZE, offset)
                r = _call(
                    loc,
                    "write",
                    lambda c, b=body, n=number: c.upload_part(**target, UploadId=upload, PartNumber=n, Body=b),
                )
                parts.append({"PartNumber": number, "ETag": r["ETag"]})
        done = {"Parts": parts}
        _call(loc, "write", lambda c: c.complete_multipart_upload(**target, UploadId=upload, MultipartUpload=done))
    except BaseException:
        try:  # best effort: an unfinished upload is never visible, but its parts take space until aborted
            client(str(loc))[0].abort_multipart_upload(**target, UploadId=upload)
        except Exception:
            pass
        raise


def get_file(loc: Location, dest: Path) -> int:
    """Download into ``dest`` (written whole, then renamed by the caller's temp-name scheme); returns the size.

    A transfer cut mid-way resumes from the bytes already written, pinned to the same object version (If-Match on
    the ETag): a shard replaced meanwhile fails rather than mixing two versions.
    """
    first = head(loc)
    etag, total = first["etag"], first["size"]
    with open(dest, "wb") as f:

        def fn(c):
            done = f.tell()
            if done >= total:
                return total
            args = {"Bucket": loc.root, "Key": loc.key, "Range": f"bytes={done}-{total - 1}"}
            if etag:
                args["IfMatch"] = etag
            body = c.get_object(**args)["Body"]
            while chunk := body.read(CHUNK):  # a cut here is retried from f.tell(): what was written
                write_local(f, chunk, dest)
            return f.tell()

        got = _call(loc, "download", fn)
        f.flush()
        os.fsync(f.fileno())
    if got != total:
        raise StorageError(str(loc), f"download ended at {got} of {total} bytes; retry", FAILED)
    return got


def abort_unfinished(loc: Location, keep: Callable[[str], bool]) -> int:
    """Abort the unfinished multipart uploads of objects directly under the prefix whose names ``keep`` accepts
    (a process killed mid-upload cannot abort its own; their parts are invisible but take space); returns how many."""
    prefix = loc.key.rstrip("/") + "/" if loc.key.strip("/") else ""
    found = _call(loc, "list", lambda c: c.list_multipart_uploads(Bucket=loc.root, Prefix=prefix).get("Uploads", []))
    n = 0
    for u in found:
        name = u["Key"][len(prefix) :]
        if "/" not in name and keep(name):
            target = {"Bucket": loc.root, "Key": u["Key"], "UploadId": u["UploadId"]}
            _call(loc, "write", lambda c, t=target: c.abort_multipart_upload(**t))
            n += 1
    return n


def delete(loc: Location) -> None:
    _call(loc, "delete", lambda c: c.delete_object(Bucket=loc.root, Key=loc.key))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
