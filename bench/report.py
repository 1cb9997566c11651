"""What every bench ends with: the versions it ran under, and its result as a dated JSON file it names;
and, for a before/after in one run, the same measurement made with another checkout's miniengine.

versions("torch", "triton")   ->  {"python": "3.12.3", "torch": "2.11.0+cu130", "triton": "3.6.0"}
write_result(result, path)    ->  bench/results/<bench>-<device>-<date>.json (with the MINIENGINE_* variables
                                  set), and a line saying so
figures_from(script, flags, directory)  ->  what `script --engine-only flags` prints as its last line (JSON),
                                            run importing miniengine from `directory`
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def versions(*packages: str) -> dict[str, str | None]:
    """Python's version and each installed package's (None for one that is not installed)."""

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version()} | {name: installed(name) for name in packages}


def write_result(result: dict, out: Path) -> Path:
    """Write `result` with the MINIENGINE_* settings in force (`environment`: the kernels' switches), so that
    a figure says which defaults it was measured under."""
    result.setdefault("environment", {k: v for k, v in sorted(os.environ.items()) if k.startswith("MINIENGINE_")})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def figures_from(script: str, flags: list[str], directory: str | None = None) -> dict:
    """`script --engine-only *flags` in a subprocess that imports miniengine from `directory` (None: this
    checkout); the JSON of the last line it prints."""
    env = {**os.environ, "PYTHONPATH": directory} if directory else dict(os.environ)
    command = [sys.executable, script, "--engine-only", *flags]
    run = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])
