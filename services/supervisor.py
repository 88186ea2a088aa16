"""``wattflow up``: every service as a local process, logs merged with a prefix, one stop.

Before anything starts, every port the stack binds is checked: a taken port stops ``up`` at
once with the port, the config key and the environment variable that change it.

``--scale SERVICE=N`` (or ``runtime.scale``) runs N instances of ingest, storage, power or
plotter (named ``storage``, ``storage-2``, ...): ingest replicas share the meters' port
(SO_REUSEPORT), storage replicas share the work queue (see README "Scaling").

Stop order keeps data: meters (simulator) first, then ingest (it publishes what it holds),
then storage, power and plotter together (each drains its queue until quiet), broker last.
A service that crashes is restarted with a growing pause (1 s, doubling up to 30 s; back to
1 s once it has run a minute); each restart count reaches the service (``WATTFLOW_RESTARTS``)
and shows in ``wattflow status``. A service that exits with ``EXIT_CANNOT_START`` (a port
taken, a folder it may not write) is not restarted: ``up`` stops everything and says why.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from shared.config import Config
from shared.service import EXIT_CANNOT_START, bound_ports, port_taken

log = logging.getLogger("up")
STOP_WAVES = (("simulate",), ("ingest",), ("storage", "power", "plotter", "dashboard"),
              ("broker",))
FIRST_PAUSE_S = 1.0
MAX_PAUSE_S = 30.0
STABLE_S = 60.0  # a service that ran this long starts its back-off afresh when it crashes


class Supervisor:
    def __init__(self, cfg: Config, config_path: str | None, simulate_rate: float | None,
                 scale: dict[str, int] | None = None):
        self.cfg = cfg
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if config_path:
            self.env["WATTFLOW_CONFIG"] = os.path.abspath(config_path)
        scale = {**cfg.runtime["scale"], **(scale or {})}
        # instances: "storage", "storage-2", ...; the broker is one
        self.names = ["broker"] + [name if i == 1 else f"{name}-{i}"
                                   for name in ("storage", "power", "plotter", "ingest")
                                   for i in range(1, scale.get(name, 1) + 1)]
        self.names.append("dashboard")  # the web page (one instance; it reads the database)
        if simulate_rate is not None:
            self.names.append("simulate")
        self.simulate_rate = simulate_rate
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_at: dict[str, float] = {}
        self.restarts: dict[str, int] = dict.fromkeys(self.names, 0)
        self.pause: dict[str, float] = dict.fromkeys(self.names, FIRST_PAUSE_S)
        self.due: dict[str, float] = {}  # crashed services: when to start them again
        self.stopping = threading.Event()
        self.out_lock = threading.Lock()
        self.failed: str | None = None

    def command(self, name: str) -> list[str]:
        cmd = [sys.executable, "-m", "services", service_of(name)]
        if name == "simulate":
            cmd += ["--rate", str(self.simulate_rate)]
        return cmd

    def start(self, name: str) -> None:
        env = dict(self.env, WATTFLOW_RESTARTS=str(self.restarts[name]))
        proc = subprocess.Popen(self.command(name), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                # own process group: Ctrl-C reaches only us, and we stop the
                                # services in an order that loses nothing
                                process_group=0)
        self.procs[name] = proc
        self.started_at[name] = time.monotonic()
        threading.Thread(target=self.pump, args=(name, proc), daemon=True).start()

    def pump(self, name: str, proc: subprocess.Popen) -> None:
        prefix = f"{name:>8} | ".encode()
        for line in iter(proc.stdout.readline, b""):
            with self.out_lock:
                sys.stdout.buffer.write(prefix + line)
                sys.stdout.buffer.flush()

    def preflight(self) -> bool:
        """Every port the stack binds must be free: say which is not, and how to change it."""
        from services.dashboard.main import dashboard_port

        ok = True
        for port in [*bound_ports(self.cfg), dashboard_port(self.cfg)]:
            reason = port_taken(port.host, port.port)
            if reason:
                log.error("cannot start: %s", port.explain(reason))
                ok = False
        return ok

    def run(self) -> int:
        def handle(signum, _frame):
            if self.stopping.is_set():
                for proc in self.procs.values():
                    proc.kill()
                os._exit(1)
            self.stopping.set()

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)
        if not self.preflight():
            return 2
        for name in self.names:
            self.start(name)
        log.info("wattflow up: meters -> tcp port %s, charts -> %s/power.png, database -> %s; "
                 "Ctrl-C stops", self.cfg.ingest["port"], self.cfg.plotter["dir"],
                 self.cfg.storage["path"])
        log.info("dashboard: http://%s:%s/", self.cfg.dashboard["host"],
                 self.cfg.dashboard["port"])
        while not self.stopping.wait(0.2):
            self.watch()
        code = self.stop()
        return 1 if self.failed else code

    def watch(self) -> None:
        now = time.monotonic()
        for name, when in list(self.due.items()):
            if now >= when:
                del self.due[name]
                self.start(name)
        for name, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[name]
            if name == "simulate" and code == 0:
                continue
            if code == EXIT_CANNOT_START:
                log.error("%s cannot start (see its message above): stopping everything", name)
                self.failed = name
                self.stopping.set()
                return
            if now - self.started_at[name] >= STABLE_S:
                self.pause[name] = FIRST_PAUSE_S
            pause = self.pause[name]
            self.pause[name] = min(pause * 2, MAX_PAUSE_S)
            self.restarts[name] += 1
            log.error("%s exited with code %s (crash %d): restarting in %gs", name, code,
                      self.restarts[name], pause)
            self.due[name] = now + pause

    def stop(self) -> int:
        log.info("stopping: meters, ingest, then storage/power/plotter/dashboard, broker last")
        worst = 0
        for wave in STOP_WAVES:
            procs = [(n, p) for n, p in self.procs.items() if service_of(n) in wave]
            for _, proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for name, proc in procs:
                try:
                    code = proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop in 30 s: killing it", name)
                    proc.kill()
                    code = proc.wait()
                if code not in (0, -signal.SIGTERM) and name != "simulate":
                    worst = 1
        log.info("all stopped")
        return worst


def service_of(instance: str) -> str:
    """``storage-2`` -> ``storage``."""
    name, _, number = instance.rpartition("-")
    return name if number.isdigit() and name else instance
