"""A real wattflow stack for tests: every service as its own process, bus on ipc://, meters on
a free TCP port of 127.0.0.1, SQLite and PNGs in a temporary folder (or, with ``storage.url``
overridden, storage on that PostgreSQL database). Always stopped."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
import zmq

from shared import config, topics
from shared.bus import Subscriber
from shared.db import storage_url
from shared.messages import Message

SERVICES = ("broker", "storage", "power", "plotter", "ingest")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str | Callable[[], str],
             step: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline
    (a callable ``what`` is asked then, to describe the state at the end)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class Stack:
    def __init__(self, tmp: Path, overrides: dict[str, Any] | None = None):
        self.tmp = tmp
        self.port = free_port()
        bus = tmp / "bus"
        bus.mkdir(exist_ok=True)
        self.config: dict[str, Any] = {
            "bus": {"publish": f"ipc://{bus}/xsub", "subscribe": f"ipc://{bus}/xpub",
                    "push": f"ipc://{bus}/work-in", "pull": f"ipc://{bus}/work-out"},
            "broker": {"xsub_bind": f"ipc://{bus}/xsub", "xpub_bind": f"ipc://{bus}/xpub",
                       "work_in_bind": f"ipc://{bus}/work-in",
                       "work_out_bind": f"ipc://{bus}/work-out"},
            "ingest": {"host": "127.0.0.1", "port": self.port,
                       "journal_dir": str(tmp / "data" / "journal")},
            # the tests' lines are stamped in 2024: no retention unless a test asks for it
            "storage": {"path": str(tmp / "data" / "wattflow.db"),
                        "retention": {k: 0 for k in ("readings_days", "power_days",
                                                     "rejected_days", "rollup_1m_days")}},
            "plotter": {"dir": str(tmp / "plots"), "interval_s": 0.5},
            "runtime": {"run_dir": str(tmp / "run"), "stats_interval_s": 0.25},
        }
        for section, values in (overrides or {}).items():
            if isinstance(values, dict):
                self.config.setdefault(section, {}).update(values)
            else:
                self.config[section] = values
        self.config_path = tmp / "config.yaml"
        self.rewrite_config()
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctx = zmq.Context()
        self.subs: list[Subscriber] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        self.stats_sub = self.subscribe(topics.STATS)
        self.last_stats: dict[str, dict] = {}  # service -> its latest stats message
        self.pg = None  # the test's own connection to a PostgreSQL database (query)
        self.by_instance: dict[str, dict] = {}  # instance id -> its latest stats message

    def rewrite_config(self) -> None:
        """Write ``self.config`` (changed by a test) to the file every service reads; the
        test's own bus clients use it too (its CURVE keys when curve is on)."""
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.cfg = config.load(self.config_path)

    def stats(self) -> dict[str, dict]:
        """The latest stats of each service (reads what arrived since the last call)."""
        self.instances()
        return self.last_stats

    def counters(self, service: str) -> dict[str, int]:
        return self.stats().get(service, {}).get("counters", {})

    def listening(self, topic: str, *services: str) -> bool:
        """The named services' publishers see a subscriber for ``topic``."""
        stats = self.stats()
        return all(topic in stats.get(s, {}).get("subscribed", ()) for s in services)

    def settled(self, lines: int) -> bool:
        """The database decided on ``lines`` lines (stored or rejected) and ingest holds
        nothing unconfirmed. Counters restart with a service, so the database is the judge."""
        gauges = self.stats().get("ingest", {}).get("gauges", {})
        return (gauges.get("unacked_lines") == 0 and gauges.get("pending_lines") == 0
                and self.count("readings") + self.count("rejected") == lines)

    def describe(self) -> str:
        stats = self.stats()
        return (f"readings={self.count('readings')} rejected={self.count('rejected')} "
                + " ".join(f"{k}: {v.get('counters')} {v.get('gauges')}" for k, v in stats.items()
                           if k in ("ingest", "storage")))

    @property
    def db_path(self) -> Path:
        return Path(self.config["storage"]["path"])

    @property
    def png_path(self) -> Path:
        return Path(self.config["plotter"]["dir"]) / "power.png"

    def wattflow(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "services", *args, "--config", str(self.config_path)]

    def start(self, *names: str) -> None:
        """Start services by instance name: ``storage``, or ``storage-2`` for a replica."""
        for name in names or SERVICES:
            service = name.rsplit("-", 1)[0] if name[-1].isdigit() else name
            with open(self.tmp / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(self.wattflow(service), env=self.env,
                                                    stdout=log, stderr=subprocess.STDOUT,
                                                    cwd=self.tmp)

    def instances(self, fresh_s: float = 3.0) -> dict[str, dict]:
        """The latest stats of every instance heard in the last ``fresh_s`` seconds (replicas
        apart), by instance id; one that stopped in order is dropped."""
        now = time.monotonic()
        for msg in drain(self.stats_sub, 20):
            self.last_stats[msg.data["service"]] = msg.data
            if msg.data.get("stopped"):
                self.by_instance.pop(msg.src, None)
            else:
                self.by_instance[msg.src] = dict(msg.data, heard=now)
        return {k: v for k, v in self.by_instance.items() if now - v["heard"] <= fresh_s}

    def subscribe(self, *wanted: bytes) -> Subscriber:
        sub = Subscriber(self.ctx, self.config["bus"]["subscribe"], list(wanted), cfg=self.cfg)
        self.subs.append(sub)
        return sub

    def wait_ready(self, timeout: float = 90.0) -> dict[str, dict]:
        """Every service reports, storage writes (not a standby), and the subscriptions data
        depends on have reached the publishers: storage sees an `ack` listener (ingest) and a
        `reading` one (power)."""
        latest = self.last_stats

        def ready() -> bool:
            self.check_alive()
            self.stats()
            return (set(latest) >= set(SERVICES)
                    and latest["storage"]["gauges"].get("role") == "writer"
                    and {"ack", "reading"} <= set(latest["storage"]["subscribed"]))

        wait_for(ready, timeout, f"all services ready (seen: {sorted(latest)})")
        return latest

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def send(self, data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(data)

    @property
    def url(self) -> str:
        return storage_url(self.cfg.storage)

    def query(self, sql: str, *params: Any) -> list[tuple]:
        """Rows of ``sql`` (``?`` placeholders) on storage's database; none before storage
        has made its schema."""
        if not self.url.startswith("sqlite"):
            return self._pg_query(sql.replace("?", "%s"), params)
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return []
        finally:
            conn.close()

    def _pg_query(self, sql: str, params: tuple) -> list[tuple]:
        import psycopg

        try:
            if self.pg is None or self.pg.closed:
                self.pg = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            return self.pg.execute(sql, params or None).fetchall()
        except psycopg.errors.UndefinedTable:  # schema not created yet
            return []

    def count(self, table: str) -> int:
        rows = self.query(f"SELECT count(*) FROM {table}")
        return rows[0][0] if rows else 0

    def stop(self, *names: str, sig: int = signal.SIGTERM, timeout: float = 20) -> dict[str, int]:
        codes = {}
        for name in names:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(sig)
        for name in names:
            try:
                codes[name] = self.procs[name].wait(timeout)
            except subprocess.TimeoutExpired:
                self.procs[name].kill()
                codes[name] = self.procs[name].wait()
        return codes

    def kill(self, name: str) -> None:
        """kill -9: no chance to flush anything."""
        self.procs[name].kill()
        self.procs[name].wait()

    def restart(self, name: str) -> None:
        self.start(name)

    def close(self) -> None:
        if self.pg is not None:
            self.pg.close()
        for sub in self.subs:
            sub.close()
        order = ("simulate", "ingest", "storage", "power", "plotter", "broker")
        for kind in order:
            names = [n for n in self.procs if n.split("-")[0] == kind]
            if names:
                self.stop(*names)
        self.ctx.term()


def drain(sub: Subscriber, timeout_ms: int) -> list[Message]:
    return sub.recv_batch(timeout_ms, 10_000)
