"""Platforms: pick the one this process runs on.

    device="auto"   1. platform plugins (entry-point group miniengine.platform_plugins) are asked in turn;
                       each returns "module:Class" when its hardware is present, else None.
                       Exactly one claiming the machine wins; two or more is an error naming them.
                    2. otherwise the first available built-in: cuda, then npu, then cpu
    device="NAME"   that built-in or plugin, which must find its hardware; anything else is an error

The choice is logged once per process. Built-ins are imported lazily, so a CPU machine never imports the
CUDA kernels and a machine without torch_npu never imports it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from miniengine.platforms.interface import Platform
from miniengine.plugins import PLATFORM_PLUGINS, platform_plugins, report_failure

# Auto-detection tries them in this order.
_BUILTIN = {
    "cuda": "miniengine.platforms.cuda:CudaPlatform",
    "npu": "miniengine.platforms.npu:NpuPlatform",
    "cpu": "miniengine.platforms.cpu:CpuPlatform",
}

logger = logging.getLogger("miniengine")
_logged: set[str] = set()


class PlatformError(ValueError):
    pass


def _load_class(target: str | type[Platform], source: str) -> type[Platform]:
    if isinstance(target, type):
        cls = target
    else:
        module_name, _, class_name = str(target).partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise PlatformError(f"{source} names {target!r}, which cannot be imported: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise PlatformError(f"{source} names {target!r}, which is not a miniengine Platform subclass")
    return cls


def _claims(plugins: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """name -> "module:Class" of each plugin that says its hardware is here; a plugin that raises is skipped."""
    claims = {}
    for name, detect in plugins.items():
        try:
            target = detect()
        except Exception as error:
            report_failure(PLATFORM_PLUGINS, name, error)
            continue
        if target is not None:
            claims[name] = target
    return claims


def resolve_platform(device: str = "auto") -> Platform:
    plugins = platform_plugins()
    if device == "auto":
        claims = _claims(plugins)
        if len(claims) > 1:
            names = " and ".join(repr(n) for n in sorted(claims))
            raise PlatformError(
                f"platform plugins {names} all claim this machine: choose one with device=NAME (--device NAME), "
                "or leave the others out with MINIENGINE_PLUGINS"
            )
        if claims:
            name, target = claims.popitem()
            cls, how = _load_class(target, f"platform plugin {name!r}"), f"platform plugin {name!r}"
        else:
            name, cls = next((n, c) for n, c in _available_builtins())
            how = "auto-detected"
    elif device in _BUILTIN:
        name, cls, how = device, _load_class(_BUILTIN[device], f"device {device!r}"), "forced"
        if not cls.is_available():
            raise PlatformError(f"device {device!r} was asked for, but it is not available on this machine")
    elif device in plugins:
        try:
            target = plugins[device]()
        except Exception as error:
            raise PlatformError(f"platform plugin {device!r} failed while detecting its hardware: {error}") from error
        if target is None:
            raise PlatformError(f"platform plugin {device!r} was asked for, but finds no hardware of its own here")
        name, cls, how = device, _load_class(target, f"platform plugin {device!r}"), "forced"
    else:
        choices = ", ".join(["auto", *_BUILTIN, *sorted(plugins)])
        raise PlatformError(f"device {device!r} is unknown: choose one of {choices}")
    if name not in _logged:
        _logged.add(name)
        logger.info("miniengine platform: %s (%s, %s.%s)", name, how, cls.__module__, cls.__name__)
    return cls()


def _available_builtins():
    for name, target in _BUILTIN.items():
        cls = _load_class(target, f"built-in platform {name!r}")
        if cls.is_available():
            yield name, cls


__all__ = ["Platform", "PlatformError", "resolve_platform"]
