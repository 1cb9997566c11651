"""miniengine: a minimal LLM inference engine — paged KV cache, prefix caching, continuous batching,
chunked prefill — written from scratch to be read.

    from miniengine import Engine, SamplingParams
    engine = Engine()        # the bundled SmolLM2-135M-Instruct
    print(engine.generate("Once upon a time", SamplingParams(max_tokens=32))[0].outputs[0].text)
"""

from miniengine.async_engine import AsyncEngine, EngineStoppedError
from miniengine.engine import Engine, PromptTooLongError
from miniengine.engine_process import EngineProcess, EngineProcessError
from miniengine.outputs import CompletionOutput, RequestOutput, StreamDelta
from miniengine.registry import ModelRegistry
from miniengine.sampling_params import SamplingParams

__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "Engine",
    "EngineProcess",
    "EngineProcessError",
    "EngineStoppedError",
    "ModelRegistry",
    "PromptTooLongError",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
]
__version__ = "0.1.0"
