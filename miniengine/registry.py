"""The model registry: which class implements each `architectures` name of a Hugging Face config.

    ModelRegistry.register_model("MyLlamaForCausalLM", "my_pkg.models:MyLlama")   # lazy: imported on use
    ModelRegistry.register_model("MyLlamaForCausalLM", MyLlama)                    # or the class itself

The registry lives in each process's memory. A model registered in the driver alone is unknown to worker
processes, so out-of-tree models should register from a general plugin (entry-point group
`miniengine.general_plugins`), which every process loads before resolving a model (plugins.py). (A tensor
parallel engine sends the workers its own registration of the model it runs when the class is importable
by name; a class defined in a script's `__main__` is not, and that is an error: distributed.py.)
A plugin that fails has what it registered withdrawn: asking for one of those architectures then says which
plugin failed, and asking for an unknown one lists the failed plugins that might have registered it.
"""

from __future__ import annotations

import importlib

from torch import nn

_BUILTIN = {
    "LlamaForCausalLM": "miniengine.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "miniengine.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "miniengine.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "miniengine.models.qwen3:Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM": "miniengine.models.qwen2_moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "miniengine.models.qwen3_moe:Qwen3MoeForCausalLM",
    "MixtralForCausalLM": "miniengine.models.mixtral:MixtralForCausalLM",
}


class UnsupportedArchitectureError(ValueError):
    pass


class PluginFailedError(UnsupportedArchitectureError):
    """The architecture asked for comes from a general plugin that raised while loading."""


class _ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, str | type[nn.Module]] = dict(_BUILTIN)
        self._withdrawn: dict[str, str] = {}  # architecture -> why: its plugin failed
        self._failed_plugins: list[str] = []  # "'name' (error)" of each general plugin that failed

    def register_model(self, architecture: str, model: str | type[nn.Module]) -> None:
        if isinstance(model, str) and ":" not in model:
            raise ValueError(f"register_model({architecture!r}, {model!r}): a lazy model is 'package.module:Class'")
        self._models[architecture] = model
        self._withdrawn.pop(architecture, None)

    def registered(self, architecture: str) -> str | type[nn.Module] | None:
        """What `architecture` is registered as in this process: None when unknown or built in (known to every
        process)."""
        model = self._models.get(architecture)
        return None if model is None or _BUILTIN.get(architecture) == model else model

    def supported_architectures(self) -> list[str]:
        return sorted(self._models)

    def snapshot(self) -> dict[str, str | type[nn.Module]]:
        return dict(self._models)

    def plugin_failed(self, plugin: str, error: str, snapshot: dict[str, str | type[nn.Module]]) -> None:
        """General plugin `plugin` raised: withdraw what it registered since `snapshot`, and remember why."""
        for arch in [a for a, m in self._models.items() if snapshot.get(a) is not m]:
            if arch in snapshot:
                self._models[arch] = snapshot[arch]
            else:
                del self._models[arch]
            self._withdrawn[arch] = f"general plugin {plugin!r} registered it, then failed ({error})"
        self._failed_plugins.append(f"{plugin!r} ({error})")

    def resolve(self, architectures: list[str]) -> type[nn.Module]:
        for arch in architectures:
            if arch in self._models:
                return self._load(arch)
        for arch in architectures:
            if arch in self._withdrawn:
                raise PluginFailedError(
                    f"architecture {arch!r} is not available: {self._withdrawn[arch]}. Its traceback is in the log; "
                    "fix the plugin, or leave it out with MINIENGINE_PLUGINS"
                )
        message = (
            f"architectures {architectures} have no implementation in this process. Supported: "
            f"{', '.join(self.supported_architectures())}. A model registered with ModelRegistry.register_model "
            "in another process (the driver) is not visible here: register it from a general plugin "
            "(entry-point group 'miniengine.general_plugins'), which every process loads."
        )
        if self._failed_plugins:
            raise PluginFailedError(
                f"{message} General plugins failed while loading, and one may be the one that registers it: "
                f"{', '.join(self._failed_plugins)}; their tracebacks are in the log"
            )
        raise UnsupportedArchitectureError(message)

    def _load(self, arch: str) -> type[nn.Module]:
        model = self._models[arch]
        if isinstance(model, str):
            module_name, _, class_name = model.partition(":")
            try:
                model = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError) as error:
                raise UnsupportedArchitectureError(
                    f"architecture {arch!r} is registered as {self._models[arch]!r}, which cannot be imported: {error}"
                ) from error
            self._models[arch] = model
        return model


ModelRegistry = _ModelRegistry()
