"""A real `llmflash serve` process for the server tests: started on 127.0.0.1 with --port 0 (the
server binds a free port and names it on stderr), its stderr drained into `lines` by a thread,
stopped with SIGTERM (a clean stop exits 0)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PYTHONPATH = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")}


class Server:
    def __init__(self, *args: str, start_timeout: float = 120.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmflash", "serve", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=PYTHONPATH,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(start_timeout) or not self.port:
            self.stop()
            raise RuntimeError("llmflash serve did not start:\n" + "".join(self.lines[-30:]))
        self.url = f"http://127.0.0.1:{self.port}"
        self.pid = self.proc.pid

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()  # it exited

    def log(self) -> str:
        return "".join(self.lines)

    def status(self, key: str) -> int:
        """A VmRSS-style field of the server's /proc status, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def raw(self, path: str, body: bytes) -> socket.socket:
        """A POST sent on a raw socket and left unread: closing the socket is a client leaving."""
        s = socket.create_connection(("127.0.0.1", self.port))
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        s.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        return s

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
