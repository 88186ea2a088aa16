"""A real, private PostgreSQL server for tests and the benchmark: its own data directory in a
temporary directory, a free port on 127.0.0.1 and a Unix socket directory of its own, run as a
non-root user (as root: the ``postgres`` user Debian's package makes, created if missing), and
stopped at the end. Debian's binaries are found in /usr/lib/postgresql/<version>/bin (the newest
version), else on PATH, else in ``WATTFLOW_PG_BIN``.

    with PostgresServer() as server:
        url = server.create_database()      # a fresh database: postgresql://...

For pytest: the session fixture ``postgres_server`` (imported once, in tests/conftest.py) yields
a started server, or None with ``PostgresServer.missing()`` saying why there is none; there,
``pg_url`` gives a test a fresh database, and ``BOTH_BACKENDS`` runs a stack test on each.
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

try:
    import pytest
except ImportError:  # the benchmark (./run-bench's venv: no test extra) needs the server only
    pytest = None

# Tests need no durability (a crashed test server is thrown away): no fsync makes them faster.
TEST_SETTINGS = {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off",
                 "deadlock_timeout": "100ms"}
PR_SET_PDEATHSIG = 1
# A test of the ``stack`` or ``make_stack`` fixtures (tests/conftest.py), run with storage on
# SQLite, then on a fresh database of the session's server (skipped where none can run).
BOTH_BACKENDS = pytest.mark.parametrize("database", ["sqlite", "postgresql"],
                                        indirect=True) if pytest else None


def find_bin() -> Path | None:
    """The directory holding initdb and postgres, or None."""
    candidates = [os.environ.get("WATTFLOW_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                         else 0, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "postgres").is_file():
            return Path(c)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process (after the switch of user): a fast shutdown when the test
    process dies, however it dies, so no server outlives its tests."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


class PostgresServer:
    def __init__(self, settings: dict[str, str] | None = None, user: str = "postgres"):
        self.bin = find_bin()
        self.settings = dict(TEST_SETTINGS if settings is None else settings)
        self.os_user = user if os.geteuid() == 0 else None  # root runs it as this user
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @staticmethod
    def missing() -> str | None:
        """Why no server can be started here (None: one can)."""
        if find_bin() is None:
            return ("PostgreSQL binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin"
                    ", on PATH or in WATTFLOW_PG_BIN: apt-get install postgresql")
        return None

    # ---- life ----------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        if self.bin is None:
            raise RuntimeError(self.missing())
        self.dir = Path(tempfile.mkdtemp(prefix="wattflow-pg-"))
        ids = self._ids()
        if ids:
            os.chown(self.dir, *ids)
        self.dir.chmod(0o700)
        data, self.sock = self.dir / "data", self.dir / "sock"
        self._run([str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--locale=C", "-N"])
        self._run(["mkdir", str(self.sock)])
        self.port = free_port()
        args = [str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port),
                "-k", str(self.sock), "-c", "listen_addresses=127.0.0.1"]
        for k, v in self.settings.items():
            args += ["-c", f"{k}={v}"]
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 (the server's, closed in stop)
        self._log = log
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent, **self._as_user())
        self._wait_ready()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # fast shutdown
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGQUIT)  # immediate
                    self.proc.wait(10)
            self.proc = None
            self._log.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- use -----------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """A URL over the server's Unix socket (TCP: ``tcp_url``)."""
        return f"postgresql://postgres@/{dbname}?host={self.sock}&port={self.port}"

    def tcp_url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.split("/")[3].split("?")[0]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.dir / "server.log").read_text().splitlines()[-n:])
        except (OSError, TypeError):
            return ""

    # ---- helpers -------------------------------------------------------------------------

    def _ids(self) -> tuple[int, int] | None:
        if self.os_user is None:
            return None
        try:
            pw = pwd.getpwnam(self.os_user)
        except KeyError:  # no such user: make one (a system user, no home, no shell)
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", self.os_user], check=True)
            pw = pwd.getpwnam(self.os_user)
        return pw.pw_uid, pw.pw_gid

    def _as_user(self) -> dict:
        ids = self._ids()
        if ids is None:
            return {}
        return {"user": ids[0], "group": ids[1], "extra_groups": []}

    def _run(self, args: list[str]) -> None:
        proc = subprocess.run(args, capture_output=True, text=True, **self._as_user())
        if proc.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stdout}{proc.stderr}")

    def _wait_ready(self, timeout_s: float = 60) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready after {timeout_s} s:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.05)  # polling for readiness, with a deadline


def postgres_server():
    """A private PostgreSQL server for the whole test session (None if none can run here)."""
    if PostgresServer.missing():
        yield None
        return
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


if pytest is not None:
    postgres_server = pytest.fixture(scope="session")(postgres_server)
