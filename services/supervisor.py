"""``wattflow up``: every service as a local process, logs merged with a prefix, one stop.

Stop order keeps data: meters (simulator) first, then ingest (it publishes what it holds),
then storage, power and plotter together (each drains its queue until quiet), broker last.
A service that dies is restarted after a pause, and said so in the log.
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

log = logging.getLogger("up")
STOP_WAVES = (("simulate",), ("ingest",), ("storage", "power", "plotter"), ("broker",))
RESTART_PAUSE_S = 1.0


class Supervisor:
    def __init__(self, cfg: Config, config_path: str | None, simulate_rate: float | None):
        self.cfg = cfg
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if config_path:
            self.env["WATTFLOW_CONFIG"] = os.path.abspath(config_path)
        self.names = ["broker", "storage", "power", "plotter", "ingest"]
        if simulate_rate is not None:
            self.names.append("simulate")
        self.simulate_rate = simulate_rate
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.out_lock = threading.Lock()

    def command(self, name: str) -> list[str]:
        cmd = [sys.executable, "-m", "services", name]
        if name == "simulate":
            cmd += ["--rate", str(self.simulate_rate)]
        return cmd

    def start(self, name: str) -> None:
        proc = subprocess.Popen(self.command(name), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                # own process group: Ctrl-C reaches only us, and we stop the
                                # services in an order that loses nothing
                                process_group=0)
        self.procs[name] = proc
        threading.Thread(target=self.pump, args=(name, proc), daemon=True).start()

    def pump(self, name: str, proc: subprocess.Popen) -> None:
        prefix = f"{name:>8} | ".encode()
        for line in iter(proc.stdout.readline, b""):
            with self.out_lock:
                sys.stdout.buffer.write(prefix + line)
                sys.stdout.buffer.flush()

    def run(self) -> int:
        def handle(signum, _frame):
            if self.stopping.is_set():
                for proc in self.procs.values():
                    proc.kill()
                os._exit(1)
            self.stopping.set()

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)
        for name in self.names:
            self.start(name)
        log.info("wattflow up: meters -> tcp port %s, charts -> %s/power.png, database -> %s; "
                 "Ctrl-C stops", self.cfg.ingest["port"], self.cfg.plotter["dir"],
                 self.cfg.storage["path"])
        while not self.stopping.wait(0.5):
            for name, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                if name == "simulate" and code == 0:
                    del self.procs[name]
                    continue
                log.error("%s exited with code %s; restarting in %ss", name, code,
                          RESTART_PAUSE_S)
                time.sleep(RESTART_PAUSE_S)
                self.start(name)
        return self.stop()

    def stop(self) -> int:
        log.info("stopping: meters, ingest, then storage/power/plotter, broker last")
        worst = 0
        for wave in STOP_WAVES:
            procs = [(n, self.procs[n]) for n in wave if n in self.procs]
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
