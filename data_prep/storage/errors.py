"""Storage errors (one line: the URL and what to fix, never a credential) and the retry loop for transient ones."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

log = logging.getLogger("catdog.storage")
T = TypeVar("T")

# Why each kind happened, for callers that react differently (a missing _info.json vs a denied key).
NOT_FOUND, DENIED, UNREACHABLE, UNAVAILABLE, CONFIG, UNSUPPORTED, FAILED = (
    "not_found", "denied", "unreachable", "unavailable", "config", "unsupported", "failed",
)  # fmt: skip


class StorageError(RuntimeError):
    """An object cannot be read or written. ``str(e)`` is one line naming the URL and what to fix; ``kind`` says
    why (NOT_FOUND, DENIED, UNREACHABLE, UNAVAILABLE, CONFIG, UNSUPPORTED, FAILED); ``url`` is the URL."""

    def __init__(self, url: str, message: str, kind: str = FAILED):
        super().__init__(f"{url}: {_one_line(scrub(message))}")
        self.url = url
        self.kind = kind


class Transient(Exception):
    """Internal: a failure worth retrying (5xx, throttling, connection reset, timeout); ``detail`` says which.
    ``answered``: the endpoint gave an HTTP answer (a 503), as opposed to none at all (refused, DNS, reset)."""

    def __init__(self, detail: str, *, answered: bool):
        super().__init__(detail)
        self.detail = detail
        self.answered = answered


def write_local(f, data: bytes, path: object) -> None:
    """Write a downloaded chunk to ``f``. A local failure (disk full) is raised as a StorageError naming ``path``,
    so the retry loop, which retries network errors (some of them OSErrors), does not retry it for minutes."""
    try:
        f.write(data)
    except OSError as e:
        msg = f"cannot write the download ({e.strerror or e}): free space there or choose another folder"
        raise StorageError(str(path), msg, FAILED) from None


# ----------------------------------------------------------------------------------------------- secrets

MIN_SECRET = 8  # shorter values are not scrubbed: they would garble ordinary words (real keys are 16-40 characters)


def _secrets() -> list[str]:
    """Values that must never be printed: the AWS secrets in the environment (files' ones are never read here)."""
    names = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECURITY_TOKEN")
    return [v for v in (os.environ.get(n, "") for n in names) if len(v) >= MIN_SECRET]


_extra_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """Also scrub ``value`` (credentials a backend resolved from a profile or file) from every message."""
    if value and len(value) >= MIN_SECRET:
        _extra_secrets.add(value)


def scrub(text: str) -> str:
    """``text`` with every known credential replaced by ``***`` (defence in depth: messages are built without
    them, but a library's own text may echo a request)."""
    for secret in sorted({*_secrets(), *_extra_secrets}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """How long transient failures are retried. ``budget_s``: once this process has reached the endpoint, an
    operation keeps retrying for this long (a store restarting mid-epoch comes back within it). ``first_contact_s``:
    before the first answer from an endpoint, connection failures give up after this much -- a wrong
    AWS_ENDPOINT_URL is reported in seconds, not minutes. Timeouts are per request."""

    budget_s: float = 120.0
    first_contact_s: float = 8.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    base_backoff_s: float = 0.2
    max_backoff_s: float = 5.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Defaults, overridden by CATDOG_STORAGE_RETRY_S (budget) and CATDOG_STORAGE_TIMEOUT_S (read timeout)."""
        out = cls()
        for var, attr in (("CATDOG_STORAGE_RETRY_S", "budget_s"), ("CATDOG_STORAGE_TIMEOUT_S", "read_timeout_s")):
            raw = os.environ.get(var)
            if raw:
                try:
                    value = float(raw)
                except ValueError:
                    raise StorageError(var, f"{raw!r} is not a number of seconds; set a number", CONFIG) from None
                out = replace(out, **{attr: value})
        return out


# Endpoints this process (or the parent it was forked from) has had an HTTP answer from: past first contact. Before
# it, a failure without an answer most likely means a wrong endpoint; after it, a store that is restarting.
_reached: set[str] = set()


def mark_reached(endpoint: str) -> None:
    _reached.add(endpoint)


def with_retries(
    op: Callable[[], T], *, url: str, endpoint: str, policy: RetryPolicy, unreachable_hint: str, what: str = "read"
) -> T:
    """Run ``op``, retrying ``Transient`` failures with jittered exponential backoff within the policy's budget;
    then a StorageError (UNREACHABLE when the endpoint never answered, else UNAVAILABLE)."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            out = op()
            _reached.add(endpoint)
            return out
        except Transient as e:
            attempt += 1
            elapsed = time.monotonic() - start
            if e.answered:
                _reached.add(endpoint)
            never = endpoint not in _reached
            budget = policy.first_contact_s if never else policy.budget_s
            if elapsed >= budget:
                if never:
                    msg = (
                        f"cannot reach {endpoint} ({e.detail}; {attempt} tries in {elapsed:.0f} s); {unreachable_hint}"
                    )
                    raise StorageError(url, msg, UNREACHABLE) from None
                raise StorageError(
                    url,
                    f"{endpoint} kept failing ({e.detail}) for {elapsed:.0f} s, {attempt} tries; the store is down or "
                    "overloaded: retry later, or allow longer with CATDOG_STORAGE_RETRY_S",
                    UNAVAILABLE,
                ) from None
            pause = min(policy.max_backoff_s, policy.base_backoff_s * 2 ** min(attempt - 1, 20))
            pause = min(pause * random.uniform(0.5, 1.0), max(0.0, budget - elapsed))
            log.warning("%s: %s failed (%s); retry %d in %.1f s", url, what, scrub(e.detail), attempt, pause)
            time.sleep(pause)
