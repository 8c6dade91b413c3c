"""minillm: a small, exact, pure-PyTorch reference engine for StreamingLLM.

    import minillm
    model = minillm.load("weights/llama-tiny")                 # config.json + safetensors
    tok = minillm.load_tokenizer("weights/llama-tiny")
    cache = model.new_cache(batch_size=1, sinks=4, window=1020)
    logits = model(ids, cache=cache)                           # any chunk length, windowed exactly
"""

from __future__ import annotations

import sys

# Started as the command line (`python -m minillm`, or the `minillm` script): install its Ctrl-C
# handling in the very first statement the package runs, so no moment of start-up can end in a
# traceback (minillm/_entry.py). A plain `import minillm` leaves the signal handlers alone.
if sys.argv and (sys.argv[0] == "-m" or sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] in ("minillm", "minillm.exe")):
    from ._entry import install_signal_handling

    install_signal_handling()

import importlib  # noqa: E402

__version__ = "0.1.0"

# The public names, imported on first use (PEP 562): `import minillm` stays light, so the console
# entry point (minillm/_entry.py) can install its signal handling before torch is imported.
_EXPORTS = {
    "Model": "core.model", "ModelConfig": "core.config", "SinkCache": "core.cache", "RowState": "core.cache",
    "MiniLLMError": "errors", "quantize_int8": "fast.quant", "compile_decode": "fast",
    "load": "api", "load_tokenizer": "api", "save_pretrained": "api", "parse_dtype": "api",
    "parse_device": "api", "DTYPES": "api",
    "ConfigWarning": "formats.config", "from_hf_config": "formats.families", "load_config": "formats.families",
    "generate": "apps.generation", "generate_batch": "apps.batching", "Request": "apps.batching",
    "ChatSession": "apps.chat", "ChatSessions": "apps.chat",
    "stream_generate": "apps.stream", "GenerationResponse": "apps.stream",
    "Engine": "apps.engine", "Event": "apps.engine", "EngineStats": "apps.engine", "QueueFull": "apps.engine",
    "SessionBusy": "apps.engine", "EngineClosed": "apps.engine",
}
_SUBMODULES = ("evaluate", "fast", "core", "testing")


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'minillm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


__all__ = ["Model", "ModelConfig", "RowState", "compile_decode", "fast", "core", "ConfigWarning", "SinkCache", "MiniLLMError", "load", "load_tokenizer",
           "save_pretrained", "generate", "generate_batch", "stream_generate", "GenerationResponse", "Request", "ChatSession", "ChatSessions", "Engine", "Event", "EngineStats", "QueueFull",
           "SessionBusy", "EngineClosed", "quantize_int8", "evaluate",
           "from_hf_config", "load_config", "parse_dtype", "parse_device", "testing", "__version__"]
