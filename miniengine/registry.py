"""The model registry: which class implements each `architectures` name of a Hugging Face config.

    ModelRegistry.register_model("MyLlamaForCausalLM", "my_pkg.models:MyLlama")   # lazy: imported on use
    ModelRegistry.register_model("MyLlamaForCausalLM", MyLlama)                    # or the class itself

The registry lives in each process's memory. A model registered in the driver alone is unknown to worker
processes, so out-of-tree models should register from a general plugin (entry-point group
`miniengine.general_plugins`), which every process loads before resolving a model.
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


class _ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, str | type[nn.Module]] = dict(_BUILTIN)

    def register_model(self, architecture: str, model: str | type[nn.Module]) -> None:
        if isinstance(model, str) and ":" not in model:
            raise ValueError(f"register_model({architecture!r}, {model!r}): a lazy model is 'package.module:Class'")
        self._models[architecture] = model

    def supported_architectures(self) -> list[str]:
        return sorted(self._models)

    def resolve(self, architectures: list[str]) -> type[nn.Module]:
        for arch in architectures:
            if arch in self._models:
                return self._load(arch)
        raise UnsupportedArchitectureError(
            f"architectures {architectures} have no implementation in this process. Supported: "
            f"{', '.join(self.supported_architectures())}. A model registered with ModelRegistry.register_model "
            "in another process (the driver) is not visible here: register it from a general plugin "
            "(entry-point group 'miniengine.general_plugins'), which every process loads."
        )

    def _load(self, arch: str) -> type[nn.Module]:
        model = self._models[arch]
        if isinstance(model, str):
            module_name, _, class_name = model.partition(":")
            model = getattr(importlib.import_module(module_name), class_name)
            self._models[arch] = model
        return model


ModelRegistry = _ModelRegistry()
