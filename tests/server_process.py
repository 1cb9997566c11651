"""A real `miniengine serve` in a child process, on a free loopback port, for the server tests.

The server prints one line once it listens ("miniengine: serving NAME at http://HOST:PORT/v1"); the
port is the one the OS picked for --port 0, so parallel runs never collide. Its log goes to a file the
tests can read (one line per request).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading

# Small, so a test run stays fast: a short context, a small KV cache, short completions.
TEST_FLAGS = ("--device", "cpu", "--num-kv-blocks", "192", "--max-model-len", "1024", "--max-completion-tokens", "16")


class ServerProcess:
    def __init__(self, model: str, *flags: str, env: dict[str, str] | None = None, timeout: float = 300) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        command = [sys.executable, "-m", "miniengine", "serve", model, "--port", "0", *TEST_FLAGS, *flags]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, **(env or {})}
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log_text()}") from None
        match = re.search(r"at (http://\S+/v1)", line)
        if match is None:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"unexpected first line {line!r}:\n{self.log_text()}")
        self.base_url = match.group(1)
        self.root = self.base_url.removesuffix("/v1")

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (summed over samples that match the labels given)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    assert found, f"no metric {name} {labels}"
    return total
