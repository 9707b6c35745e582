"""Where data lives: a local path, ``s3://bucket/prefix`` or ``http(s)://host/prefix``; parsing only, no I/O."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

S3 = "s3"
WEB = ("http", "https")
SUPPORTED = (S3, *WEB)
# RFC 3986 scheme followed by "://". A Windows drive ("C:\\x") has no "//" after the colon, so it stays a path.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(path: str | os.PathLike) -> str | None:
    """The scheme of ``scheme://...`` (lower case), None for a local path."""
    m = _SCHEME.match(os.fspath(path)) if isinstance(path, str) else None
    return m.group(1).lower() if m else None


def is_url(path: str | os.PathLike) -> bool:
    """True for any ``scheme://...`` string, supported or not: such a string must never become a local folder."""
    return url_scheme(path) is not None


def unsupported_scheme(path: str | os.PathLike) -> str | None:
    """The scheme of a ``scheme://...`` path that storage cannot open (``foo://x`` -> ``"foo"``), else None.

    Lets a command refuse ``foo://bucket/x`` with one line instead of creating a local folder named ``foo:``.
    """
    scheme = url_scheme(path)
    return scheme if scheme is not None and scheme not in SUPPORTED else None


def redact(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class BadURL(ValueError):
    """A URL storage cannot open; ``url`` (credentials removed) and ``reason`` (what to do)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class Location:
    """One object or folder: ``scheme`` "" (local), "s3", "http" or "https"; ``root`` the bucket or host (empty
    for local); ``key`` the path inside it, "/"-separated, no leading "/" for URLs."""

    scheme: str
    root: str
    key: str

    @classmethod
    def parse(cls, where: str | os.PathLike | Location) -> Location:
        """Parse a URL or local path; BadURL (a ValueError, one line naming it) for a URL storage cannot open."""
        if isinstance(where, Location):
            return where
        if not isinstance(where, str):
            return cls("", "", os.fspath(where))
        scheme = url_scheme(where)
        if scheme is None:
            return cls("", "", where)
        if scheme not in SUPPORTED:
            raise BadURL(redact(where), f"unsupported URL scheme {scheme}://; use s3://, https:// or a local path")
        parts = urlsplit(where)
        if parts.query or parts.fragment:
            raise BadURL(redact(where), "a storage URL takes no ?query or #fragment; remove it")
        if not parts.netloc:
            what = "bucket" if scheme == S3 else "host"
            raise BadURL(redact(where), f"no {what} in the URL; write {scheme}://{what.upper()}/PREFIX")
        if scheme == S3 and "@" in parts.netloc:
            # s3://KEY:SECRET@bucket would put credentials in configs and logs; they belong in the AWS variables
            raise BadURL(redact(where), "credentials do not go in an s3:// URL; set them in AWS_* or a profile")
        return cls(scheme, parts.netloc, parts.path.lstrip("/"))

    @property
    def is_local(self) -> bool:
        return self.scheme == ""

    @property
    def path(self) -> Path:
        """The local path (local locations only)."""
        if not self.is_local:
            raise ValueError(f"{self} is not a local path")
        return Path(self.key)

    @property
    def name(self) -> str:
        """The last component (a file name), as ``Path.name``."""
        return self.key.rstrip("/").rsplit("/", 1)[-1] if not self.is_local else self.path.name

    def join(self, *names: str) -> Location:
        """A child: ``s3://b/shards`` joined with ``train-000000.tar`` is ``s3://b/shards/train-000000.tar``."""
        if self.is_local:
            return Location("", "", str(Path(self.key).joinpath(*names)))
        key = self.key.rstrip("/")
        for name in names:
            key = f"{key}/{name.strip('/')}" if key else name.strip("/")
        return Location(self.scheme, self.root, key)

    def with_name(self, name: str) -> Location:
        """The sibling called ``name`` (``Path.with_name``)."""
        if self.is_local:
            return Location("", "", str(self.path.with_name(name)))
        parent = self.key.rstrip("/").rpartition("/")[0]
        return Location(self.scheme, self.root, f"{parent}/{name}" if parent else name)

    def __truediv__(self, name: str) -> Location:
        """``loc / "train-000000.tar"``: ``join`` with one name, as ``Path`` does (so a shard folder's code reads
        the same for a local ``Path`` and a URL)."""
        return self.join(name)

    def __str__(self) -> str:
        if self.is_local:
            return self.key
        return redact(f"{self.scheme}://{self.root}/{self.key}")
