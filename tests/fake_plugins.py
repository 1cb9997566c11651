"""Installable-looking plugin packages written into a temporary directory, for the plugin and platform tests.

A directory on sys.path holding `NAME-0.1.dist-info/entry_points.txt` is a distribution to
`importlib.metadata`, exactly as `pip install` leaves one in site-packages; its modules sit beside it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from miniengine import plugins
from miniengine.registry import ModelRegistry


def write_package(root: Path, dist: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> Path:
    """Write distribution `dist` under `root`: its entry points ({group: {name: "module:attr"}}) and modules
    ({module name: source}). Put `root` on sys.path to install it."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = []
    for group, points in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Plugin state as in a new process (nothing loaded, the built-in registry), restored afterwards."""
    monkeypatch.setattr(plugins, "_loaded_general", set())
    monkeypatch.setattr(ModelRegistry, "_models", ModelRegistry.snapshot())
    monkeypatch.setattr(ModelRegistry, "_withdrawn", {})
    monkeypatch.setattr(ModelRegistry, "_failed_plugins", [])
    monkeypatch.delenv("MINIENGINE_PLUGINS", raising=False)
