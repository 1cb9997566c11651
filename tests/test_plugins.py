"""Entry-point plugins: general plugins register models (once per process, filtered by MINIENGINE_PLUGINS,
failures reported and only fatal for the model they were to register), stat-logger plugins receive steps,
and the example plugin package (installed by the README's test command) works end to end."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
from fake_plugins import fresh_plugins, write_package  # noqa: F401  (a fixture)
from tiny_models import make_tiny_model

from miniengine import Engine, ModelRegistry, SamplingParams
from miniengine.plugins import GENERAL_PLUGINS, STAT_LOGGER_PLUGINS, load_general_plugins
from miniengine.registry import PluginFailedError, UnsupportedArchitectureError

PLUGIN_MODULE = """
    from miniengine import ModelRegistry
    calls = []

    def register_a():
        calls.append("a")
        ModelRegistry.register_model("PluginAForCausalLM", "miniengine.models.llama:LlamaForCausalLM")

    def register_b():
        calls.append("b")
        ModelRegistry.register_model("PluginBForCausalLM", "miniengine.models.llama:LlamaForCausalLM")

    def register_then_fail():
        ModelRegistry.register_model("BrokenForCausalLM", "miniengine.models.llama:LlamaForCausalLM")
        raise RuntimeError("the broken plugin's own bug")
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture
def packages(tmp_path, monkeypatch, fresh_plugins):  # noqa: F811
    entry_points = {
        GENERAL_PLUGINS: {
            "plugin_a": "fake_models:register_a",
            "plugin_b": "fake_models:register_b",
            "broken": "fake_models:register_then_fail",
            "unimportable": "no_such_module:register",
        },
        STAT_LOGGER_PLUGINS: {"recorder": "fake_loggers:Recorder", "not_a_logger": "fake_loggers:NotALogger"},
    }
    loggers = """
        class Recorder:
            instances = []

            def __init__(self):
                self.steps = []
                Recorder.instances.append(self)

            def record(self, stats):
                self.steps.append(stats)

        class NotALogger:
            pass
    """
    modules = {"fake_models": PLUGIN_MODULE, "fake_loggers": loggers}
    root = write_package(tmp_path / "site", "fake-plugins", entry_points, modules)
    monkeypatch.syspath_prepend(str(root))
    for name in modules:  # each test imports its own fresh copy
        sys.modules.pop(name, None)
    yield root
    for name in modules:
        sys.modules.pop(name, None)


def test_general_plugins_load_once_and_honour_the_filter(packages, monkeypatch):
    import fake_models

    monkeypatch.setenv("MINIENGINE_PLUGINS", "plugin_a")
    load_general_plugins()
    load_general_plugins()  # idempotent: each plugin runs once per process
    assert fake_models.calls == ["a"]
    assert "PluginAForCausalLM" in ModelRegistry.supported_architectures()
    assert "PluginBForCausalLM" not in ModelRegistry.supported_architectures()

    monkeypatch.setenv("MINIENGINE_PLUGINS", "")  # empty: none
    load_general_plugins()
    assert fake_models.calls == ["a"]

    monkeypatch.setenv("MINIENGINE_PLUGINS", " plugin_b , plugin_a")  # a list, spaces allowed
    load_general_plugins()
    assert fake_models.calls == ["a", "b"]


def test_unset_filter_loads_all_and_failures_are_reported(packages, caplog):
    import fake_models

    with caplog.at_level(logging.ERROR, logger="miniengine"):
        load_general_plugins()
    assert fake_models.calls == ["a", "b"]
    failed = {r.getMessage().split("'")[1]: r.getMessage() for r in caplog.records}
    assert set(failed) == {"broken", "unimportable"}
    assert "Traceback" in failed["broken"] and "the broken plugin's own bug" in failed["broken"]
    assert "no_such_module" in failed["unimportable"]

    # Only the model the failed plugin registered is refused, and the error names the plugin.
    with pytest.raises(PluginFailedError, match="general plugin 'broken' registered it, then failed"):
        ModelRegistry.resolve(["BrokenForCausalLM"])
    assert ModelRegistry.resolve(["PluginAForCausalLM"]).__name__ == "LlamaForCausalLM"
    # An architecture nobody registered: the failed plugins are suspects, named.
    with pytest.raises(PluginFailedError, match="'unimportable' .*ModuleNotFoundError"):
        ModelRegistry.resolve(["NobodysForCausalLM"])


def test_engine_runs_despite_a_failing_plugin_unless_it_needs_it(packages, model_dir, tmp_path):
    engine = Engine(str(model_dir), num_kv_blocks=16, block_size=4)  # loads every plugin; two fail
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3

    broken = tmp_path / "broken"
    broken.mkdir()
    config = (model_dir / "config.json").read_text().replace("LlamaForCausalLM", "BrokenForCausalLM")
    (broken / "config.json").write_text(config)
    with pytest.raises(PluginFailedError, match="'broken'"):
        Engine(str(broken), num_kv_blocks=16, block_size=4)


def test_stat_logger_plugins_receive_steps(packages, model_dir, monkeypatch, caplog):
    import fake_loggers

    monkeypatch.setenv("MINIENGINE_PLUGINS", "recorder,not_a_logger")
    with caplog.at_level(logging.ERROR, logger="miniengine"):
        engine = Engine(str(model_dir), num_kv_blocks=16, block_size=4, stat_loggers=[])
    assert "'not_a_logger'" in caplog.text and "no record(stats) method" in caplog.text
    (recorder,) = fake_loggers.Recorder.instances
    assert engine.stat_loggers == [recorder]
    engine.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert sum(s.num_generation_tokens for s in recorder.steps) == 4
    assert sum(s.num_prompt_tokens for s in recorder.steps) == 5


def test_a_plugin_model_is_visible_in_a_new_process_a_driver_registration_is_not(packages, tmp_path):
    """What tensor parallel workers will do: a fresh process loads the general plugins and sees their models,
    but not one registered with register_model in the driver's memory alone."""
    ModelRegistry.register_model("DriverOnlyForCausalLM", "miniengine.models.llama:LlamaForCausalLM")
    script = textwrap.dedent("""
        from miniengine import ModelRegistry
        from miniengine.plugins import load_general_plugins
        from miniengine.registry import UnsupportedArchitectureError
        load_general_plugins()
        print(ModelRegistry.resolve(["PluginBForCausalLM"]).__name__)
        try:
            ModelRegistry.resolve(["DriverOnlyForCausalLM"])
        except UnsupportedArchitectureError as error:
            print(error)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(packages), *sys.path]), MINIENGINE_PLUGINS="plugin_b")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    resolved, error = result.stdout.splitlines()
    assert resolved == "LlamaForCausalLM"
    assert "another process (the driver) is not visible here" in error and "general plugin" in error


def test_unimportable_lazy_model_is_a_clear_error(fresh_plugins):  # noqa: F811
    ModelRegistry.register_model("TypoForCausalLM", "miniengine.models.lama:LlamaForCausalLM")
    with pytest.raises(UnsupportedArchitectureError, match="'miniengine.models.lama:LlamaForCausalLM', which cannot"):
        ModelRegistry.resolve(["TypoForCausalLM"])


# ---- the example plugin package: examples/plugin_package, installed by the README's test command ----------


def test_example_plugin_package_registers_its_model_and_logger(model_dir, tmp_path):
    """Its model reads a checkpoint with its own parameter names and must equal the built-in Llama on the
    same weights; its stat logger is attached to every engine and counts what the engine did."""
    from miniengine_example_plugin import TokenCounter
    from miniengine_example_plugin.checkpoint import convert_llama_checkpoint

    convert_llama_checkpoint(model_dir, tmp_path)  # the same weights under the plugin's names
    ours = Engine(str(tmp_path), num_kv_blocks=32, block_size=4)
    llama = Engine(str(model_dir), num_kv_blocks=32, block_size=4)
    assert type(ours.runner.model).__name__ == "ExampleLlamaForCausalLM"
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    got = [o.outputs[0].token_ids for o in ours.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in llama.generate(prompts, params)]
    (counter,) = [s for s in ours.stat_loggers if isinstance(s, TokenCounter)]
    assert counter.summary()["generation_tokens"] == 24 and counter.summary()["finished_requests"] == 2
