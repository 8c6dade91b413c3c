"""Kept streams on disk: `Engine(session_dir=...)` loads them, `Engine.shutdown()` writes them.

One safetensors file per kept stream, written as `SinkCache.save` writes a cache
(minillm/apps/state.py): the row's keys, values (and raw sink keys) as tensors, a token stream's
ids as an int64 tensor, and as JSON in the header its count, sinks and window, the model's
fingerprint, the session name, and for a conversation what `ChatSession.save` keeps (messages,
rendered prompt, the reply's unfed token, the template's hash) plus the conversation's digest.
A file is named `<fingerprint[:16]>-<id>.safetensors`, so engines of different models never
write each other's files. On loading, a file saved from another model (or with another chat
template, sinks or window) is refused and left as it is: `engine.refused_files` names it in one
line, and its conversation starts fresh when it comes back. `shutdown()` writes every kept stream
and removes the files this engine loaded that it no longer keeps (continued or evicted streams).
"""

from __future__ import annotations

import dataclasses
import secrets
from array import array

import torch

from ..core.cache import RowState
from ..errors import MiniLLMError, first_line
from ..identity import fingerprint
from .state import VERSION, _int, _read, _template_hash, _write

STREAM_FORMAT = "minillm.EngineStream"


def _check(info: dict, tensors: dict, engine, fp: str) -> RowState:
    """The file's row, checked against the engine's cache (MiniLLMError naming the mismatch)."""
    cache = engine.cache
    if info.get("fingerprint") != fp:
        raise MiniLLMError("it was saved from a different model (other weights or config)")
    sinks, window = _int(info, "sinks", 0), _int(info, "window", 1)
    if (sinks, window) != (cache.sinks, cache.window):
        raise MiniLLMError(f"it holds a stream of sinks {sinks} + window {window}, the engine's cache is "
                           f"{cache.sinks} + {cache.window}")
    positions = getattr(cache, "positions", "cache")
    if info.get("positions", "cache") != positions:
        raise MiniLLMError(f"its stream is in {info.get('positions')!r:.20} positions, the engine's cache in "
                           f"{positions!r}")
    want = {"k": cache.k, "v": cache.v, "raw_sink_k": cache.raw_sink_k}
    extra = set(tensors) - set(want) - {"tokens", "log"}
    if info.get("logged") is True:  # a conversation kept as its log alone
        if set(want) & set(tensors):
            raise MiniLLMError("a logged stream's file holds keys")
        return None
    if extra:
        raise MiniLLMError(f"unexpected tensor(s) {sorted(extra)}")
    for name, buf in want.items():
        got = tensors.get(name)
        if (got is None) != (buf is None) or (buf is not None and (
                tuple(got.shape) != tuple(buf.shape[:1] + buf.shape[2:]) or got.dtype != buf.dtype)):
            raise MiniLLMError(f"its {name} does not fit the engine's cache (another dtype or shape)")
    blank = RowState(k=cache.k[:, 0], v=cache.v[:, 0], raw_sink_k=None, tokens_seen=0, sinks=sinks, window=window,
                     owner_id=-1)
    extra_fields = {"positions": positions} if hasattr(blank, "positions") else {}
    return dataclasses.replace(blank, k=tensors["k"].to(cache.device), v=tensors["v"].to(cache.device),
                               raw_sink_k=None if cache.raw_sink_k is None else tensors["raw_sink_k"].to(cache.device),
                               tokens_seen=_int(info, "tokens_seen", 0), fingerprint=fp, **extra_fields)


def _chat_state(info: dict, engine) -> dict:
    template = engine.tok.chat_template if engine.use_template else None
    if info.get("template") != _template_hash(template):
        raise MiniLLMError("it was saved with another chat template than this engine's")
    messages = info.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(x, str) for x in m.values())
            for m in messages):
        raise MiniLLMError("it has no valid messages")
    if not isinstance(info.get("prompt_text"), str) or not isinstance(info.get("digest"), str):
        raise MiniLLMError("it has no valid prompt_text or digest")
    unfed = info.get("unfed")
    if unfed is not None:
        _int(info, "unfed", 0, engine.model.config.vocab_size - 1)
    return dict(messages=[dict(m) for m in messages], prompt_text=info["prompt_text"], unfed=unfed,
                turns=_int(info, "turns", 0), digest=info["digest"])


def load_streams(engine) -> None:
    """Load every kept stream of `engine.session_dir` written by an engine of this model."""
    d = engine.session_dir
    if d.exists() and not d.is_dir():
        raise MiniLLMError(f"session_dir {d} is not a directory")
    d.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(engine.model)
    engine.loaded_files = []
    loaded = []
    for path in sorted(d.glob("*.safetensors")):
        try:
            info, tensors = _read(path, STREAM_FORMAT)
            state = _check(info, tensors, engine, fp)
            key = info.get("key")
            if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
                raise MiniLLMError(f"its session name {key!r:.40} is not a string or an integer")
            used = _int(info, "used", 0)
            if state is None and info.get("kind") != "chat":
                raise MiniLLMError("only a conversation may be kept as its log")
            if info.get("kind") == "chat":
                chat_state = _chat_state(info, engine)
                stream = engine.new_stream(key, conversation=True)
                c = stream.chat
                c.messages, c.prompt_text, c.unfed, c.turns = (chat_state[k] for k in
                                                               ("messages", "prompt_text", "unfed", "turns"))
                stream.digest = chat_state["digest"]
                log = tensors.get("log")
                if log is not None and (log.dim() != 1 or log.dtype != torch.int64
                                        or not bool(((log >= 0) & (log < engine.model.config.vocab_size)).all())):
                    raise MiniLLMError("its log is not a list of the model's token ids")
                stream.log = None if log is None else array("q", log.tolist())
                if state is None and stream.log is None:
                    raise MiniLLMError("it holds neither keys nor a log")
            elif info.get("kind") == "tokens":
                ids = tensors.get("tokens")
                if ids is None or ids.dim() != 1 or ids.dtype != torch.int64:
                    raise MiniLLMError("it has no valid token ids")
                stream = engine.new_stream(key, conversation=False)
                stream.tokens = ids.tolist()
                if any(not 0 <= i < engine.model.config.vocab_size for i in stream.tokens):
                    raise MiniLLMError("its token ids are out of the model's vocabulary")
            else:
                raise MiniLLMError(f"its kind {info.get('kind')!r:.20} is neither 'chat' nor 'tokens'")
        except MiniLLMError as e:
            engine.refused_files.append(f"{path}: refused: {first_line(e)}")
            continue
        stream.parked, stream.used, stream.file = state, used, path.name
        engine.loaded_files.append(path.name)
        loaded.append(stream)
    for s in sorted(loaded, key=lambda s: s.used):
        if s.key is not None and any(o.key == s.key for o in engine.streams):  # one stream per name: the newest
            engine._drop(next(o for o in engine.streams if o.key == s.key))
        engine.streams.append(s)
        engine._clock = max(engine._clock, s.used)
    engine._evict()


def save_streams(engine) -> None:
    """Write every kept stream to `engine.session_dir`; remove the files loaded and no longer kept."""
    d = engine.session_dir
    d.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(engine.model)
    written = set()
    for s in list(engine.streams):
        state = s.parked if s.parked is not None else None if s.row is None else engine.cache.export_row(s.row)
        tensors = {}
        if state is not None:
            tensors = {"k": state.k, "v": state.v}
            if state.raw_sink_k is not None:
                tensors["raw_sink_k"] = state.raw_sink_k
        c = engine.cache
        info = {"format": STREAM_FORMAT, "version": VERSION, "sinks": c.sinks, "window": c.window,
                "tokens_seen": len(s.log) if state is None else state.tokens_seen, "logged": state is None,
                "fingerprint": fp, "key": s.key, "used": s.used, "positions": getattr(c, "positions", "cache")}
        if s.log is not None:
            tensors["log"] = torch.tensor(s.log, dtype=torch.int64)
        if s.chat is not None:
            c = s.chat
            info.update(kind="chat", messages=c.messages, prompt_text=c.prompt_text, unfed=c.unfed, turns=c.turns,
                        digest=s.digest, template=_template_hash(c.template))
        else:
            info.update(kind="tokens")
            tensors["tokens"] = torch.tensor(s.tokens, dtype=torch.int64)
        if s.file is None or not s.file.startswith(fp[:16] + "-"):
            s.file = f"{fp[:16]}-{secrets.token_hex(12)}.safetensors"
        _write(d / s.file, tensors, info)
        written.add(s.file)
    for name in getattr(engine, "loaded_files", []):
        if name not in written:
            (d / name).unlink(missing_ok=True)
    engine.loaded_files = sorted(written)
