"""An example miniengine plugin package: a model registered by a general plugin, and a stat logger.

Both arrive through entry points declared in pyproject.toml, so installing the package is all it takes:
every miniengine process then knows the architecture "ExampleLlamaForCausalLM", and every engine counts its
tokens with a `TokenCounter`.
"""

from __future__ import annotations

from miniengine import ModelRegistry
from miniengine_example_plugin.stat_logger import TokenCounter

ARCHITECTURE = "ExampleLlamaForCausalLM"


def register() -> None:
    """The general plugin: called once in every process. A lazy "module:Class" string keeps start-up cheap
    (the model's module is imported only when a checkpoint asks for it), and registering twice is harmless."""
    ModelRegistry.register_model(ARCHITECTURE, "miniengine_example_plugin.model:ExampleLlamaForCausalLM")


__all__ = ["ARCHITECTURE", "TokenCounter", "register"]
