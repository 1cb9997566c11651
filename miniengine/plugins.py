"""Plugins: code from other installed packages that miniengine runs, found through Python entry points.

    entry-point group               each entry point is                        when it runs
    miniengine.general_plugins      a function, no arguments (registers models) once per process, before any
                                                                               model is resolved
    miniengine.platform_plugins     a function: "module:Class" if its hardware when a platform is resolved
                                    is present, else None                      (platforms/__init__.py)
    miniengine.stat_logger_plugins  a class (or factory), no arguments, whose  when an Engine is built: one
                                    objects have record(stats)                 logger per engine

`MINIENGINE_PLUGINS` picks plugins by entry-point name, in every group: unset loads them all, "a,b" only
those, an empty value none. A plugin that raises is logged with its name and traceback and skipped; the
engine goes on. The one exception is a general plugin's model: asking for an architecture that a failed
plugin registered (or may have registered) is an error that names the plugin (see registry.py).

`load_general_plugins` is the one function every process calls (the engine now, each tensor parallel worker
too), so a model a plugin registers is known wherever it is built. It loads each plugin once per process.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from miniengine.registry import ModelRegistry
from miniengine.stats import StatLogger

GENERAL_PLUGINS = "miniengine.general_plugins"
PLATFORM_PLUGINS = "miniengine.platform_plugins"
STAT_LOGGER_PLUGINS = "miniengine.stat_logger_plugins"

logger = logging.getLogger("miniengine")

_loaded_general: set[str] = set()  # general plugins already run in this process (each runs once)


def selected_entry_points(group: str) -> list[EntryPoint]:
    """The entry points of `group` that MINIENGINE_PLUGINS lets through, one per name, sorted by name."""
    wanted = os.environ.get("MINIENGINE_PLUGINS")
    names = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        if names is None or ep.name in names:
            found.setdefault(ep.name, ep)  # the same distribution seen twice on sys.path: keep the first
    return [found[name] for name in sorted(found)]


def report_failure(group: str, name: str, error: BaseException) -> str:
    """Log a plugin's failure with its traceback; returns a one-line summary."""
    summary = f"{type(error).__name__}: {error}"
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logger.error("miniengine plugin %r (%s) failed and is skipped: %s\n%s", name, group, summary, trace)
    return summary


def load_general_plugins() -> None:
    """Run every selected general plugin not yet run in this process. Idempotent; call it before resolving
    a model, in every process that builds one."""
    for ep in selected_entry_points(GENERAL_PLUGINS):
        if ep.name in _loaded_general:
            continue
        _loaded_general.add(ep.name)
        before = ModelRegistry.snapshot()
        try:
            ep.load()()
        except Exception as error:
            summary = report_failure(GENERAL_PLUGINS, ep.name, error)
            ModelRegistry.plugin_failed(ep.name, summary, before)


def platform_plugins() -> dict[str, Callable[[], Any]]:
    """name -> detection function of each selected platform plugin (those that fail to import are skipped)."""
    found = {}
    for ep in selected_entry_points(PLATFORM_PLUGINS):
        try:
            found[ep.name] = ep.load()
        except Exception as error:
            report_failure(PLATFORM_PLUGINS, ep.name, error)
    return found


def load_stat_logger_plugins() -> list[StatLogger]:
    """One new logger from each selected stat-logger plugin."""
    loggers = []
    for ep in selected_entry_points(STAT_LOGGER_PLUGINS):
        try:
            stat_logger = ep.load()()
            if not callable(getattr(stat_logger, "record", None)):
                raise TypeError(f"{ep.value} made a {type(stat_logger).__name__}, which has no record(stats) method")
            loggers.append(stat_logger)
        except Exception as error:
            report_failure(STAT_LOGGER_PLUGINS, ep.name, error)
    return loggers
