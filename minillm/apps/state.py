"""Saving and loading streams: `SinkCache.save/load` and `ChatSession.save/load`.

    cache.save("story.safetensors")                        # every row (or rows=[...])
    cache = minillm.SinkCache.load("story.safetensors", model)
    chat.save("chat.safetensors")
    chat = minillm.ChatSession.load("chat.safetensors", model, tok)

One safetensors file each, like mlx-lm's `save_prompt_cache`: the keys, values (and raw sink keys)
as tensors, and everything else as JSON in the file's header (`__metadata__["minillm"]`): the
sinks and window, the position convention ("cache" when a file predates it), each row's count, the model's fingerprint (minillm/identity.py) and, for a chat,
its messages, rendered prompt, sampling settings and its generator's state (a uint8 tensor). It is
written atomically (a temporary file renamed into place) and read with safetensors, never pickle.
Loading refuses a file saved from another model (its fingerprint differs) and checks every value
it reads; the stream then continues bit-identically to one that was never saved.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..atomic import write_atomic
from ..errors import MiniLLMError, first_line
from ..formats.reading import parse_json

CACHE_FORMAT, CHAT_FORMAT, VERSION = "minillm.SinkCache", "minillm.ChatSession", 1


def _write(path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    from safetensors.torch import save

    path = Path(path)
    if path.is_dir():
        raise MiniLLMError(f"save: {path} is a directory")
    meta = {"minillm": json.dumps(info, allow_nan=False)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(tensors, metadata=meta)
    try:
        write_atomic(path, lambda f: f.write(data))
    except OSError as e:
        raise MiniLLMError(f"save: cannot write {path}: {e.strerror or e}") from None


def _read(path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MiniLLMError(f"load: no such file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own errors for a damaged file
        raise MiniLLMError(f"load: {path} is not a readable safetensors file ({first_line(e)})") from None
    if not isinstance(meta.get("minillm"), str):
        raise MiniLLMError(f"load: {path} holds no minillm state (no 'minillm' entry in its header)")
    info = parse_json(meta["minillm"], f"load: {path}'s minillm header")
    if not isinstance(info, dict) or info.get("format") != kind or info.get("version") != VERSION:
        raise MiniLLMError(f"load: {path} is not a {kind} file of version {VERSION} "
                           f"(it says {info.get('format') if isinstance(info, dict) else None!r})")
    return info, tensors


def _fingerprint_of_cache(cache) -> str:
    from ..identity import of_owner

    fp = of_owner(cache.owner_id)
    if fp is None:
        raise MiniLLMError("save: the model that made this cache no longer exists; its streams cannot be named")
    return fp


def _check_owner(info: dict, model, path) -> None:
    from ..identity import fingerprint

    if info.get("fingerprint") != fingerprint(model):
        raise MiniLLMError(f"load: {path} was saved from a different model (other weights or config: its "
                           f"fingerprint is {str(info.get('fingerprint'))[:12]}..., this model's "
                           f"{fingerprint(model)[:12]}...)")


def _int(info: dict, key: str, low: int, high: int = 2**63 - 1) -> int:
    v = info.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise MiniLLMError(f"load: the file's {key} must be an integer in [{low}, {high}], got {v!r}")
    return v


def _positions(info: dict) -> str:
    """The file's position convention: "cache" if it names none (files from before the choice)."""
    from ..core.contract import check_positions

    return check_positions(info.get("positions", "cache"), "load: the file's positions")


def _rows_state(cache, rows: list[int]) -> tuple[dict[str, torch.Tensor], list[int]]:
    tensors = {"k": cache.k[:, rows], "v": cache.v[:, rows]}
    if cache.raw_sink_k is not None:
        tensors["raw_sink_k"] = cache.raw_sink_k[:, rows]
    return tensors, [int(cache.tokens_seen[r]) for r in rows]


def _import(cache, tensors: dict, counts, n: int, fingerprint: str, model) -> None:
    import dataclasses

    if not isinstance(counts, list) or len(counts) != n:
        raise MiniLLMError(f"load: the file lists {counts!r:.40} as its rows' counts, expected {n} integers")
    extra = set(tensors) - {"k", "v", "raw_sink_k", "generator"}
    if extra:
        raise MiniLLMError(f"load: unexpected tensor(s) {sorted(extra)} in the file")
    for name in ("k", "v"):
        if name not in tensors or tensors[name].dim() != 5 or tensors[name].shape[1] != n:
            raise MiniLLMError(f"load: the file's {name} tensor is missing or not (layers, {n}, heads, slots, dim)")
    raw = tensors.get("raw_sink_k")
    blank = cache.export_row(0)  # a RowState of this cache (its class, without importing the core here)
    for b in range(n):
        cache.import_row(b, dataclasses.replace(blank, k=tensors["k"][:, b], v=tensors["v"][:, b],
                                                raw_sink_k=None if raw is None else raw[:, b], tokens_seen=counts[b],
                                                owner_id=-1, fingerprint=fingerprint))


def save_cache(cache, path, rows=None) -> None:
    rows = list(range(cache.batch_size)) if rows is None else cache.rows(rows, "save")
    tensors, counts = _rows_state(cache, rows)
    _write(path, tensors, {"format": CACHE_FORMAT, "version": VERSION, "sinks": cache.sinks, "window": cache.window,
                           "positions": cache.positions, "tokens_seen": counts,
                           "fingerprint": _fingerprint_of_cache(cache)})


def load_cache(path, model):
    from ..checks import check_model

    check_model(model)
    info, tensors = _read(path, CACHE_FORMAT)
    _check_owner(info, model, path)
    counts = info.get("tokens_seen")
    n = len(counts) if isinstance(counts, list) else 0
    if n < 1:
        raise MiniLLMError(f"load: {path} holds no rows")
    dtype = tensors["k"].dtype if "k" in tensors else model.dtype
    cache = model.new_cache(batch_size=n, sinks=_int(info, "sinks", 0), window=_int(info, "window", 1), dtype=dtype,
                            positions=_positions(info))
    _import(cache, {k: v.to(cache.device) for k, v in tensors.items()}, counts, n, info["fingerprint"], model)
    return cache


# ----------------------------------------------------------------------------------------------
# A chat session


def _template_hash(template: str | None) -> str | None:
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()


def save_session(session, path) -> None:
    s = session
    tensors, counts = _rows_state(s.cache, [s.row])
    tensors["generator"] = s.generator.get_state()
    sampling = {k: s.sampling[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "ignore_eos")}
    _write(path, tensors, {
        "format": CHAT_FORMAT, "version": VERSION, "sinks": s.cache.sinks, "window": s.cache.window,
        "positions": s.cache.positions,
        "tokens_seen": counts, "fingerprint": _fingerprint_of_cache(s.cache), "sampling": sampling,
        "template": _template_hash(s.template), "messages": s.messages, "prompt_text": s.prompt_text,
        "unfed": s.unfed, "turns": s.turns})


def load_session(cls, path, model, tokenizer):
    from ..checks import check_model

    check_model(model)
    info, tensors = _read(path, CHAT_FORMAT)
    _check_owner(info, model, path)
    sampling = info.get("sampling")
    if not isinstance(sampling, dict) or set(sampling) != {"max_new_tokens", "temperature", "top_k", "top_p",
                                                           "ignore_eos"}:
        raise MiniLLMError(f"load: {path} has no valid sampling settings")
    template = info.get("template")
    if template is not None and template != _template_hash(tokenizer.chat_template):
        raise MiniLLMError(f"load: {path} was saved with another chat template than this tokenizer's")
    messages = info.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(x, str) for x in m.values())
            for m in messages):
        raise MiniLLMError(f"load: {path} has no valid messages")
    if not isinstance(info.get("prompt_text"), str):
        raise MiniLLMError(f"load: {path} has no valid prompt_text")
    unfed = info.get("unfed")
    if unfed is not None:
        _int(info, "unfed", 0, model.config.vocab_size - 1)
    if not isinstance(sampling["ignore_eos"], bool):
        raise MiniLLMError("load: the file's ignore_eos must be true or false")
    session = cls(model, tokenizer, sinks=_int(info, "sinks", 0), window=_int(info, "window", 1),
                  use_template=template is not None, positions=_positions(info), **sampling)
    dtype = tensors["k"].dtype if "k" in tensors else model.dtype
    if dtype != session.cache.dtype:
        raise MiniLLMError(f"load: the file's streams are {dtype}, the model is {session.cache.dtype}")
    _import(session.cache, {k: v.to(session.cache.device) for k, v in tensors.items() if k != "generator"},
            info.get("tokens_seen"), 1, info["fingerprint"], model)
    gen = tensors.get("generator")
    try:
        session.generator.set_state(gen)
    except (TypeError, RuntimeError) as e:
        raise MiniLLMError(f"load: {path} holds no valid generator state ({first_line(e)})") from None
    session.messages = [dict(m) for m in messages]
    session.prompt_text, session.unfed, session.turns = info["prompt_text"], unfed, _int(info, "turns", 0)
    return session
