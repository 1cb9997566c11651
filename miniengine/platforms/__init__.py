"""Platforms: pick the one this process runs on.

`device="auto"` takes the first available built-in platform; a named device must exist. Built in: `cpu`.
"""

from __future__ import annotations

import importlib

from miniengine.platforms.interface import Platform

_BUILTIN = {"cuda": "miniengine.platforms.cuda:CudaPlatform", "cpu": "miniengine.platforms.cpu:CpuPlatform"}


def resolve_platform(device: str = "auto") -> Platform:
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = device
    if name not in _BUILTIN:
        raise ValueError(f"device {device!r} is not supported: choose one of auto, {', '.join(_BUILTIN)}")
    module_name, _, class_name = _BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["Platform", "resolve_platform"]
