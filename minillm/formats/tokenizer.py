"""Text <-> token ids, from a model directory's tokenizer.json or tokenizer.model, or a GGUF file.

`load_tokenizer("dir/or/hub-id/or/x.gguf")` returns a `Tokenizer` with the few things the engine
needs: `encode(text) -> list[int]`, `decode(ids) -> str`, the BOS/EOS ids, the chat template, and
`StreamDecoder` for printing text while tokens are generated.

`encode(text)` gives the ids transformers' `AutoTokenizer.from_pretrained(dir)(text).input_ids`
gives (tests/test_tokenizer.py and tests/test_smollm2.py check it). Whether a BOS is added
follows the tokenizer's own files, never the model type:
- `tokenizer.json`: its post-processor (a TemplateProcessing that adds `<s>`, or none);
- `tokenizer.model`: `add_bos_token` / `add_eos_token` in tokenizer_config.json (transformers
  5.x adds neither when the keys are absent);
- a GGUF file: its `tokenizer.ggml.add_bos_token`.
Text that spells a special token (`<|im_start|>`, `</s>`) is that token, as in transformers.

Backends, one interface:
- `tokenizer.json`  -> the `tokenizers` library (byte-level BPE for GPT-NeoX/Falcon/MPT/SmolLM2,
  and the sentencepiece-converted files of Llama). Preferred when both files exist.
- `tokenizer.model` -> `sentencepiece` (original Llama releases), the model's own tokenizer.
  transformers instead converts it to a `tokenizers` BPE, which agrees on ordinary text but can
  split differently text that starts with or is only whitespace (see the tests).
- a GGUF file -> a `tokenizers` byte-level BPE built from its vocab, merges and token types.

Special ids come, in this order, from generation_config.json (what `generate` uses in
transformers), tokenizer_config.json (token strings), config.json, and finally the sentencepiece
model itself. The chat template comes from chat_template.jinja (where transformers writes it),
then tokenizer_config.json, then the GGUF's `tokenizer.chat_template`.
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from minillm.errors import MiniLLMError, first_line
from .hub import resolve_model_dir
from .reading import check_input, is_present, read_json, read_text_file

_REPLACEMENT = "\ufffd"  # what decoders print for an incomplete UTF-8 sequence


# ----------------------------------------------------------------------------------------------
# Backends: the minimal surface of each library, so Tokenizer need not know which one it has.


class _HFTokenizers:
    """tokenizer.json through the `tokenizers` library."""

    name = "tokenizers"

    def __init__(self, path: Path | None = None, *, json_text: str | None = None, where: str = ""):
        from tokenizers import Tokenizer as _Tk

        try:
            self.tk = _Tk.from_file(str(path)) if json_text is None else _Tk.from_str(json_text)
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise MiniLLMError(f"cannot read tokenizer {path or where}: {first_line(e)}") from None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool) -> list[int]:
        # special=True runs the post-processor (which adds BOS where the file says so).
        return self.tk.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def default_bos_eos(self) -> tuple[int | None, int | None]:
        return None, None  # tokenizer.json has no notion of BOS/EOS; the configs say


class _SentencePiece:
    """tokenizer.model through the `sentencepiece` library."""

    name = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # RuntimeError / OSError from the C++ parser
            raise MiniLLMError(f"cannot read tokenizer file {path}: {first_line(e)}") from None
        self.vocab_size = self.sp.get_piece_size()
        # Control and unknown pieces (<s>, </s>, <unk>) spelled in the text are those tokens, as in
        # transformers; sentencepiece itself would spell them out character by character.
        self.specials = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._split = (re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")
                       if self.specials else None)
        self._anchor = self.sp.encode("\n")

    def encode(self, text: str, special: bool) -> list[int]:
        """Ids of `text`; never adds BOS/EOS itself (Tokenizer does).

        Between special tokens, a piece of text after the first is encoded as a continuation (no
        dummy-prefix "▁"), which is what transformers' Metaspace(prepend_scheme="first") does."""
        if self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(p for p in self._split.split(text) if p):
            if part in self.specials:
                ids.append(self.specials[part])
            elif not ids and k == 0:
                ids += self.sp.encode(part)
            else:
                cont = self.sp.encode("\n" + part)
                ids += cont[len(self._anchor):] if cont[: len(self._anchor)] == self._anchor else self.sp.encode(part)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        # Control tokens (<s>, </s>) have no surface text in sentencepiece: they decode to "".
        if skip_special:
            ids = [i for i in ids if not self.sp.is_control(i)]
        return self.sp.decode(ids)

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces; only trust it if it round-trips.
        return i if self.sp.id_to_piece(i) == token else None

    def default_bos_eos(self) -> tuple[int | None, int | None]:
        bos, eos = self.sp.bos_id(), self.sp.eos_id()  # -1 when the model has none
        return (bos if bos >= 0 else None), (eos if eos >= 0 else None)


# ----------------------------------------------------------------------------------------------


class Tokenizer:
    """A model's tokenizer: encode/decode plus its BOS/EOS ids and chat template.

    Attributes:
        bos_id: the model's BOS id, or None if it has none.
        adds_bos: whether `encode(text)` starts with BOS (the tokenizer files decide).
        eos_id: the (first) end-of-sequence id, or None.
        eos_ids: every id that ends generation (generation_config.json may list several).
        vocab_size: number of ids the tokenizer knows (may be < the model's padded vocab).
        chat_template: the Jinja chat template (chat_template.jinja, tokenizer_config.json or
            the GGUF), if any.
        backend: "tokenizers", "sentencepiece" or "gguf".
    """

    def __init__(
        self,
        backend: _HFTokenizers | _SentencePiece,
        *,
        bos_id: int | None,
        eos_ids: Sequence[int],
        chat_template: str | None = None,
        sp_add_bos: bool = False,
        sp_add_eos: bool = False,
        clean_up_spaces: bool = False,
        backend_name: str | None = None,
        template_tokens: dict[str, str] | None = None,
    ):
        self._backend = backend
        self.backend = backend_name or backend.name
        self.vocab_size: int = backend.vocab_size
        self.bos_id = bos_id
        self.eos_id: int | None = eos_ids[0] if eos_ids else None
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        self.chat_template = chat_template
        # The strings a chat template gets as bos_token / eos_token: the tokenizer's own (from
        # tokenizer_config.json, as transformers passes them), whatever generation_config.json
        # lists as ids for stopping.
        tt = dict(template_tokens or {})
        for name, i in (("bos_token", bos_id), ("eos_token", self.eos_id)):
            if not tt.get(name) and i is not None:
                tt[name] = backend.id_to_token(i) or ""
        self.template_tokens = {k: v for k, v in tt.items() if isinstance(v, str)}
        # sentencepiece has no post-processor: transformers' add_bos_token/add_eos_token say.
        self._sp_add = (sp_add_bos and bos_id is not None, sp_add_eos and self.eos_id is not None)
        self.clean_up_spaces = clean_up_spaces
        probe = self.encode("a")
        self.adds_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        # Decoding "a" + ids and cutting "a" off renders ids as they would appear mid-text (used by
        # StreamDecoder, so that e.g. sentencepiece does not strip a word's leading space).
        self._anchor = backend.encode("a", special=False)
        self._anchor_text = backend.decode(self._anchor)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """Load from a local directory holding tokenizer.json or tokenizer.model (+ configs)."""
        d = Path(model_dir)
        if is_present(d / "tokenizer.json"):
            check_input(d / "tokenizer.json")  # a FIFO would block inside the library
            backend: _HFTokenizers | _SentencePiece = _HFTokenizers(d / "tokenizer.json")
        elif is_present(d / "tokenizer.model"):
            check_input(d / "tokenizer.model")
            backend = _SentencePiece(d / "tokenizer.model")
        else:
            raise MiniLLMError(f"no tokenizer.json or tokenizer.model in {d}")
        gen_cfg = _read_json(d / "generation_config.json")
        tok_cfg = _read_json(d / "tokenizer_config.json")
        model_cfg = _read_json(d / "config.json")
        bos, eos = _special_ids(backend, gen_cfg, tok_cfg, model_cfg, d)
        flags = {}
        if backend.name == "sentencepiece":
            flags = {"sp_add_bos": tok_cfg.get("add_bos_token") is True,
                     "sp_add_eos": tok_cfg.get("add_eos_token") is True}
        return cls(backend, bos_id=bos, eos_ids=eos, chat_template=_chat_template(d, tok_cfg),
                   clean_up_spaces=tok_cfg.get("clean_up_tokenization_spaces") is True,
                   template_tokens=_template_tokens(tok_cfg), **flags)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (vocab, merges, token types, special ids)."""
        from .gguf import GGUFFile, open_gguf, tokenizer_json

        f = path if isinstance(path, GGUFFile) else open_gguf(path)
        text, settings = tokenizer_json(f)
        backend = _HFTokenizers(json_text=text, where=f.path.name)
        return cls(backend, bos_id=settings["bos_id"], eos_ids=settings["eos_ids"],
                   chat_template=settings["chat_template"], backend_name="gguf",
                   template_tokens={"bos_token": settings["bos_token"], "eos_token": settings["eos_token"]})

    def __repr__(self) -> str:
        return (
            f"Tokenizer(backend={self.backend!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)})"
        )

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`.

        add_bos=None (the default): exactly what the tokenizer's own files do, as transformers'
        `tokenizer(text).input_ids` (a BOS where they add one, none where they do not).
        add_bos=True: exactly one BOS in front (when the model has a BOS), whatever the files say.
        add_bos=False: no special tokens added at all (a continuation of a stream).
        """
        if not isinstance(text, str):
            raise MiniLLMError(f"encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer can encode it
            raise MiniLLMError(f"encode: the text holds a lone surrogate U+{ord(text[e.start]):04X} at character "
                               f"{e.start}, which is not valid Unicode text") from None
        if add_bos is not None and not isinstance(add_bos, bool):
            raise MiniLLMError(f"encode: add_bos must be True, False or None, got {add_bos!r}")
        ids = self._backend.encode(text, special=add_bos is not False)
        if add_bos is not False and self._backend.name == "sentencepiece":
            add_b, add_e = self._sp_add
            if add_b:
                ids = [self.bos_id, *ids]
            if add_e:
                ids = [*ids, self.eos_id]
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]  # never zero, never two
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple, or 1-D tensor). Special tokens (BOS, EOS, `<|im_end|>`)
        are kept, or left out with `skip_special_tokens=True`, as in transformers."""
        if not isinstance(skip_special_tokens, bool):
            raise MiniLLMError(f"decode: skip_special_tokens must be True or False, got {skip_special_tokens!r}")
        if isinstance(ids, (str, bytes)):
            raise MiniLLMError(f"decode expects token ids, got {type(ids).__name__} (decode ids, not text)")
        try:
            raw = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            if any(isinstance(i, bool) for i in raw):  # True is not the token id 1
                raise TypeError
            ids = [operator.index(i) for i in raw]  # refuses 1.5 and "3" rather than truncating or parsing them
        except TypeError:
            raise MiniLLMError("decode expects a flat sequence of integer token ids") from None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise MiniLLMError(
                    f"token id {i} is out of range for a vocabulary of {self.vocab_size}"
                )
        text = self._backend.decode(ids, skip_special_tokens) if skip_special_tokens else self._backend.decode(ids)
        return _clean_up_tokenization(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, tokenize: bool = True,
                            chat_template: str | None = None, **kwargs):
        """The conversation `messages` ([{"role": ..., "content": ...}, ...]) rendered with the
        checkpoint's chat template, as transformers' `apply_chat_template` renders it: a list of
        token ids (the template writes every special token itself, so nothing is added), or the
        text with `tokenize=False`. `add_generation_prompt=True` opens the assistant's turn. Extra
        keywords reach the template as variables, as in transformers."""
        from ..apps.chat import render_chat_template

        template = self.chat_template if chat_template is None else chat_template
        if template is None:
            raise MiniLLMError("apply_chat_template: this tokenizer has no chat template (give chat_template=...)")
        if isinstance(messages, dict) or not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, dict) for m in messages):
            raise MiniLLMError("apply_chat_template: messages must be a list of {'role': ..., 'content': ...} dicts")
        for name, flag in (("add_generation_prompt", add_generation_prompt), ("tokenize", tokenize)):
            if not isinstance(flag, bool):
                raise MiniLLMError(f"apply_chat_template: {name} must be True or False, got {flag!r}")
        text = render_chat_template(template, list(messages), add_generation_prompt=add_generation_prompt,
                                    **{**self.template_tokens, **kwargs})
        return self.encode(text, add_bos=False) if tokenize else text

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end a reply: `eos_ids` and the end-of-turn token the chat template writes."""
        from .stops import template_end_tokens

        found = (self.token_to_id(t) for t in template_end_tokens(self.chat_template))
        return self.eos_ids | frozenset(i for i in found if i is not None)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer as a Hugging Face directory: tokenizer.json (or tokenizer.model),
        tokenizer_config.json (its special tokens and flags), chat_template.jinja (if it has a
        template) and generation_config.json's stop ids; `load_tokenizer(directory)` reads back a
        tokenizer that encodes, decodes and renders chats identically."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise MiniLLMError(f"save_pretrained: {d} exists and is not a directory")
        d.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {k: v for k, v in self.template_tokens.items()}
        config["clean_up_tokenization_spaces"] = self.clean_up_spaces
        if isinstance(self._backend, _SentencePiece):
            (d / "tokenizer.model").write_bytes(self._backend.sp.serialized_model_proto())
            config["add_bos_token"], config["add_eos_token"] = self._sp_add
        else:
            self._backend.tk.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
        if self.chat_template is not None:
            (d / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        eos = sorted(self.eos_ids, key=lambda i: (i != self.eos_id, i))  # the first EOS first
        gen_path = d / "generation_config.json"
        gen = _read_json(gen_path)
        gen.update({"bos_token_id": self.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None})
        gen_path.write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        return d

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (`<|im_end|>`), or None if the vocabulary lacks it."""
        if not isinstance(token, str):
            raise MiniLLMError(f"token_to_id takes a token's string, got {type(token).__name__}")
        return self._backend.token_to_id(token)

    def token_text(self, token_id: int | None) -> str:
        """The token's own string (`<s>`, `<|im_end|>`): what chat templates call bos_token/eos_token."""
        if token_id is None:
            return ""
        text = self._backend.id_to_token(_token_id(token_id, "token_text", self.vocab_size))
        if text is None:
            raise MiniLLMError(f"token id {token_id} is out of range for a vocabulary of {self.vocab_size}")
        return text

    def decoder(self, *, start_of_text: bool = True) -> StreamDecoder:
        """A fresh StreamDecoder over this tokenizer (see there)."""
        if not isinstance(start_of_text, bool):
            raise MiniLLMError(f"decoder: start_of_text must be True or False, got {start_of_text!r:.40}")
        return StreamDecoder(self, start_of_text=start_of_text)

    def _decode_mid_text(self, ids: list[int]) -> str:
        """Text of `ids` as it reads in the middle of a longer text (no leading-space strip)."""
        text = self.decode(self._anchor + ids)
        if self._anchor and text.startswith(self._anchor_text):
            return text[len(self._anchor_text) :]
        return self.decode(ids)  # a decoder where the anchor trick does not apply


def _token_id(value, what: str, vocab_size: int) -> int:
    """One token id: an int (a numpy or 0-d tensor integer too: anything with __index__) in [0, vocab_size); "a", 1.5,
    True or None is refused by name, never converted."""
    try:
        if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
            raise TypeError
        i = operator.index(value)
    except TypeError:
        raise MiniLLMError(f"{what}: a token id must be an integer, got {value!r:.40} ({type(value).__name__})") from None
    if not 0 <= i < vocab_size:
        raise MiniLLMError(f"{what}: token id {i} is out of range for a vocabulary of {vocab_size}")
    return i


class StreamDecoder:
    """Turns generated ids into text, one id at a time.

    `push(id)` returns the text that id completes (often "", e.g. while a multi-byte UTF-8
    character is split over several byte-level tokens); `flush()` returns whatever is held back.
    Whenever the ids spell valid UTF-8 (any text, with special ids between characters),
    `"".join(d.push(i) for i in ids) + d.flush() == tok.decode(ids)` exactly. (An invalid byte
    run, which a model can sample, may come out with a different number of U+FFFD.)

    How: ids not yet printed are kept in `pending` and decoded together; their text is printed
    once it does not end in U+FFFD (an unfinished character). After the first printed text, ids
    are decoded "mid-text" (behind an anchor token), so a sentencepiece word keeps its leading
    space, while the very first word loses it exactly as `decode` does. Each push decodes at most
    `MAX_PENDING` + 1 ids, so the cost per token is O(1) however long generation runs.

    With `start_of_text=False` the first id is already rendered mid-text, as a continuation of a
    prompt (" Hello" rather than "Hello").
    """

    MAX_PENDING = 16  # a UTF-8 character is <= 4 bytes; past this the U+FFFD is real: print it

    def __init__(self, tokenizer: Tokenizer, *, start_of_text: bool = True):
        self.tokenizer = tokenizer
        self.pending: list[int] = []
        self._started = not start_of_text  # has any text been printed yet?

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly "")."""
        self.pending.append(_token_id(token_id, "push", self.tokenizer.vocab_size))
        tok = self.tokenizer
        text = tok._decode_mid_text(self.pending) if self._started else tok.decode(self.pending)
        if len(self.pending) < self.MAX_PENDING:
            if text.endswith(_REPLACEMENT):
                return ""  # wait for the rest of the character
            if not self._started and not text:
                # Nothing visible yet (e.g. sentencepiece strips leading spaces): keep decoding
                # from the start of the text so the strip matches `decode`.
                return ""
        self.pending.clear()
        self._started = True
        return text

    def flush(self) -> str:
        """Return the held-back text (U+FFFD for an unfinished character); call at the end."""
        if not self.pending:
            return ""
        tok = self.tokenizer
        text = tok._decode_mid_text(self.pending) if self._started else tok.decode(self.pending)
        self.pending.clear()
        self._started = True
        return text


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a local model directory, a hub repo id (fetched into the hub cache) or a GGUF file."""
    from .gguf import is_gguf

    if is_gguf(name_or_path):
        return Tokenizer.from_gguf(name_or_path)
    return Tokenizer.from_dir(resolve_model_dir(name_or_path))


# ----------------------------------------------------------------------------------------------
# Reading the configs.


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, {} if the file is absent (a directory or FIFO of that name is
    refused by kind, not skipped)."""
    data = read_json(path, what=path.name, optional=True)
    return {} if data is None else data


def _special_ids(
    backend: _HFTokenizers | _SentencePiece,
    gen_cfg: dict[str, Any],
    tok_cfg: dict[str, Any],
    model_cfg: dict[str, Any],
    d: Path,
) -> tuple[int | None, list[int]]:
    """(bos_id, eos_ids) from the first source that defines each one."""
    sp_bos, sp_eos = backend.default_bos_eos()

    def ids(value: Any, where: str) -> list[int]:
        # An id, a list of ids, or None; every id must exist in the vocabulary.
        if value is None:
            return []
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < backend.vocab_size:
                raise MiniLLMError(
                    f"{d / where}: special token id {v!r} is not in the vocabulary "
                    f"(size {backend.vocab_size})"
                )
        return list(dict.fromkeys(values))  # dedupe, keep order

    def token(value: Any) -> list[int]:
        # tokenizer_config.json gives strings, or AddedToken dicts {"content": ...}. A token the
        # vocabulary lacks is skipped (falls through to the next source).
        if isinstance(value, dict):
            value = value.get("content")
        if not isinstance(value, str):
            return []
        i = backend.token_to_id(value)
        return [] if i is None else [i]

    def first(key: str, sp_default: int | None) -> list[int]:
        sources = (  # lazily, so a bad fallback is not an error when an earlier source answers
            lambda: ids(gen_cfg.get(f"{key}_token_id"), "generation_config.json"),
            lambda: token(tok_cfg.get(f"{key}_token")),
            lambda: ids(model_cfg.get(f"{key}_token_id"), "config.json"),
        )
        for source in sources:
            if found := source():
                return found
        return [] if sp_default is None else [sp_default]

    bos = first("bos", sp_bos)
    return (bos[0] if bos else None), first("eos", sp_eos)


def _chat_template(d: Path, tok_cfg: dict[str, Any]) -> str | None:
    """chat_template.jinja (transformers >= 4.47 writes it there), else tokenizer_config.json's
    chat_template: a string, or a list of named templates of which "default" is used."""
    jinja = d / "chat_template.jinja"
    if is_present(jinja):
        return read_text_file(jinja, what="chat template", encoding="utf-8")
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        if "default" not in named:  # transformers refuses to guess too
            raise MiniLLMError(f"{d / 'tokenizer_config.json'}: chat_template lists templates "
                               f"{sorted(map(str, named))} but none named 'default'")
        t = named["default"]
    if t is not None and not isinstance(t, str):
        raise MiniLLMError(f"{d / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                           f"named templates, got {type(t).__name__}")
    return t


def _template_tokens(tok_cfg: dict[str, Any]) -> dict[str, str]:
    """bos_token / eos_token / unk_token / pad_token strings of tokenizer_config.json (a string or
    an AddedToken dict), as transformers hands them to chat templates."""
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = tok_cfg.get(name)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[name] = v
    return out


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (for tokenizer_config's clean_up_tokenization_spaces)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text

