"""A real headless Chromium for tests: ``driver.mjs`` (playwright-core driving Debian's
/usr/bin/chromium) as a child process, commanded one JSON line at a time."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def missing() -> str | None:
    """What the browser tests lack on this machine (None: nothing), after ``npm ci`` once."""
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "no node/npm (apt-get install -y nodejs npm)"
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"npm ci failed in {HERE}: {done.stderr[-1000:]}"
    return None


class Browser:
    def __init__(self, timezone: str | None = None):
        env = dict(os.environ, CHROMIUM=CHROMIUM)
        if timezone:
            env["BROWSER_TZ"] = timezone
        self.proc = subprocess.Popen(["node", str(HERE / "driver.mjs")], cwd=HERE, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.answers: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._read_err, daemon=True)]
        for t in self.readers:
            t.start()
        self.next_id = 1
        first = self._answer(0, 120)
        assert first == "ready", first

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.answers.put(json.loads(line))
        self.answers.put(None)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _answer(self, want: int, timeout: float) -> Any:
        try:
            msg = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the browser did not answer in {timeout}s") from None
        if msg is None:
            raise AssertionError("the browser driver exited: " + "".join(self.stderr[-30:]))
        assert msg["id"] == want, msg
        if not msg["ok"]:
            raise AssertionError(f"browser: {msg['error']}")
        return msg["value"]

    def do(self, cmd: str, timeout: float = 60, **args: Any) -> Any:
        mid = self.next_id
        self.next_id += 1
        self.proc.stdin.write(json.dumps({"id": mid, "cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._answer(mid, timeout)

    def goto(self, url: str, width: int = 1200, height: int = 1600) -> None:
        self.do("goto", url=url, width=width, height=height)

    def eval(self, expr: str) -> Any:
        return self.do("eval", expr=expr)

    def screenshot(self, path: Path, full: bool = True) -> Path:
        self.do("screenshot", path=str(path), full=full)
        return path

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.do("close", timeout=30)
            except (AssertionError, OSError):
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self.readers:
            t.join(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()
