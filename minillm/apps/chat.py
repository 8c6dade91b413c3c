"""A conversation over one persistent streaming cache, and conversations sharing one cache.

    chat = minillm.ChatSession(model, tok, window=1020)
    for piece in chat.turn("Hello!"):
        print(piece, end="")

`ChatSession` keeps one cache for a whole conversation, like the paper's MT-Bench demo: each turn
feeds only the new text (rendered with the checkpoint's chat template, as transformers renders it,
or a plain `USER: ... ASSISTANT:` format) and generates the reply on top of everything before it.

`ChatSessions` keeps several conversations in one cache, a row each, and `turns({i: text, ...})`
runs a turn of any of them together (`chat_turns`): their new tokens in one ragged prefill, their
replies decoded in the same batched steps of the continuous-batching loop (minillm/apps/batching.py),
each session rendering its turns exactly as a lone `ChatSession`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping

import torch

from ..checks import check_bool, check_int, check_model, check_tokenizer
from ..errors import MiniLLMError, first_line
from .batching import Row, row_seed, run_rows
from .generation import generate, new_stream_ids
from .sampling import Sampler, check_sampling, check_seed, make_sampler
from .template import message as template_message
from .template import render_budgeted, sandbox_class


# ----------------------------------------------------------------------------------------------
# Rendering a turn: the plain format, or the checkpoint's chat template


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Ids of `text` as it continues a stream. SentencePiece-style tokenizers put a space in front
    of every text they encode ("\nUSER" would come back as " \nUSER"); encoding "\n" + text and
    dropping the ids of "\n" avoids that. Falls back to a plain encode if the two do not split."""
    anchor = tokenizer.encode("\n", add_bos=False)
    ids = tokenizer.encode("\n" + text, add_bos=False)
    if ids[: len(anchor)] == anchor:
        return ids[len(anchor):]
    return tokenizer.encode(text, add_bos=False)


PLAIN_FIRST = "USER: {text}\nASSISTANT:"
PLAIN_NEXT = "\nUSER: {text}\nASSISTANT:"


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool,
                         bos_token: str = "", eos_token: str = "", time_limit: float | None = None,
                         max_chars: int | None = None, **special_tokens: str) -> str:
    """Render a Hugging Face chat template (Jinja) the way transformers does: a sandboxed
    environment with trim_blocks/lstrip_blocks, loop controls ({% break %}, {% continue %}), the
    {% generation %} tag (rendered as its body), transformers' `tojson` (no HTML escaping, no ASCII
    escaping), and `raise_exception` and `strftime_now`. It runs within a budget
    (minillm/apps/template.py): `time_limit` seconds (default MINILLM_TEMPLATE_SECONDS, else 5)
    and `max_chars` characters of output or of any value it makes (default
    MINILLM_TEMPLATE_MAX_CHARS, else 10,000,000), in any thread. Any failure is one MiniLLMError."""
    try:
        import jinja2
    except ImportError:  # pragma: no cover - jinja2 is a declared dependency
        raise MiniLLMError("the chat template needs jinja2 (pip install jinja2)") from None
    env = _jinja_env(jinja2)
    try:
        return render_budgeted(env, template, dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                              bos_token=bos_token, eos_token=eos_token, **special_tokens),
                               time_limit, max_chars)
    except MiniLLMError:
        raise
    except Exception as e:  # a template is code: TemplateError, but also TypeError, RecursionError, ...
        raise MiniLLMError(template_message(e, jinja2.TemplateError)) from None


_ENV = None


def _jinja_env(jinja2):
    """One environment, built once, with what transformers' `_compile_jinja_template` adds."""
    global _ENV
    if _ENV is not None:
        return _ENV
    import datetime
    import json

    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: transformers marks assistant text with it; rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = sandbox_class()(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.check_filters()
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    _ENV = env
    return env


# ----------------------------------------------------------------------------------------------
# One conversation


from ..formats.stops import END_OF_TURN  # noqa: E402,F401  (a reply stops on these too, when the template uses them)

# The sessions holding each cache's rows ({cache: {row: weakref to its ChatSession}}).
_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ChatSession:
    """A conversation over one persistent streaming cache.

    `turn(text)` feeds the user's turn and yields the reply as text pieces (incrementally
    detokenized). Only new tokens are fed each turn. With a chat template, the whole conversation
    (system prompt, every turn, every reply) is rendered as transformers' `apply_chat_template(...,
    add_generation_prompt=True)` renders it, and only the text after the previous reply is fed:
    the previous reply is rendered as a marker, and what follows the marker is the new part. So the
    ids fed over a conversation are the ids transformers tokenizes for it (tests/test_chat.py),
    also for templates that trim replies or strip <think> blocks from earlier turns (the cache
    keeps the reply as it was generated). If the part before the marker is not what was fed (a
    template that rewrites earlier turns), the new turn is rendered on its own instead. A reply
    ends at EOS or at the template's end-of-turn token (`<|im_end|>` for ChatML).

    By default the session has a cache of its own. With `cache=` (a cache of B rows) and `row=`,
    it keeps its conversation in that row of a cache shared with other sessions (`sinks`,
    `window` and `positions`, the position convention, are then the cache's); `minillm.ChatSessions` runs the turns of several at once.
    A session holds its row: a second session on the same row of the same cache is refused until
    the first is closed (`session.close()`, or `with ChatSession(...) as session:`) or garbage
    collected. A closed session takes no more turns; its row's keys stay as they are (a new
    session there continues on them unless the row is reset: `cache.reset(row)`).
    """

    MARK = "\ue000minillm-reply\ue001"  # private-use characters: no template alters them

    def __init__(self, model, tokenizer, *, sinks: int = 4, window: int = 1020,
                 max_new_tokens: int | None = 256, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = 0.95, seed: int = 0, ignore_eos: bool = False,
                 use_template: bool = True, system: str | None = None, cache=None, row: int = 0,
                 positions: str = "cache"):
        check_model(model)
        check_tokenizer(tokenizer)
        check_sampling(temperature, top_k, top_p)
        check_int("max_new_tokens", max_new_tokens, 0, none_ok=True)
        check_seed(seed)
        check_bool("ignore_eos", ignore_eos)
        check_bool("use_template", use_template)
        if system is not None and not isinstance(system, str):
            raise MiniLLMError(f"system must be a string, got {type(system).__name__}")
        self.model, self.tok = model, tokenizer
        self.template = tokenizer.chat_template if use_template else None
        if system is not None and self.template is None:
            raise MiniLLMError("a system prompt needs a chat template to render it, and this chat has none "
                               "(the checkpoint has no template, or --no-template was given)")
        if cache is None:
            self.cache = model.new_cache(batch_size=1, sinks=sinks, window=window, positions=positions)
            self.row = check_int("row", row, 0, 0, hint=" (a session with its own cache has one row)")
        elif not hasattr(cache, "tokens_seen"):
            raise MiniLLMError(f"cache must be a SinkCache from model.new_cache(), got {type(cache).__name__}")
        else:
            self.cache = cache
            self.row = check_int("row", row, 0, cache.batch_size - 1, hint=f" (the cache has {cache.batch_size} rows)")
        self.stop_ids = frozenset(tokenizer.eos_ids) | self._end_of_turn_ids() | getattr(model, "eos_ids", frozenset())
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             ignore_eos=ignore_eos, eos_ids=self.stop_ids, vocab_size=tokenizer.vocab_size)
        self.generator = torch.Generator(device=model.device).manual_seed(seed)
        tt = getattr(tokenizer, "template_tokens", None)
        self.template_tokens = dict(tt) if tt else {"bos_token": self._token_text(tokenizer.bos_id),
                                                    "eos_token": self._token_text(tokenizer.eos_id)}
        self.messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        self.prompt_text = ""  # the rendered conversation up to this turn's generation prompt
        self.unfed: int | None = None  # the reply's last token: generated but not yet in the cache
        self.turns = 0
        self.closed = False
        self._claim()

    def _claim(self) -> None:
        """Hold this session's row of its cache: two conversations in one row would overwrite
        each other's keys, silently."""
        rows = _HELD.setdefault(self.cache, {})
        held = rows.get(self.row)
        other = held() if held is not None else None
        if other is not None and other is not self and not other.closed:
            raise MiniLLMError(f"row {self.row} of this cache is held by another ChatSession; close that "
                               f"session first (session.close()) or give this one another row")
        rows[self.row] = weakref.ref(self)

    def close(self) -> None:
        """Release the cache row; the session takes no more turns. Closing twice is harmless."""
        self.closed = True
        rows = _HELD.get(self.cache, {})
        held = rows.get(self.row)
        if held is not None and held() in (self, None):
            del rows[self.row]

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _end_of_turn_ids(self) -> frozenset[int]:
        if not self.template or not hasattr(self.tok, "token_to_id"):
            return frozenset()
        found = (self.tok.token_to_id(t) for t in END_OF_TURN if t in self.template)
        return frozenset(i for i in found if i is not None)

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        if hasattr(self.tok, "token_text"):  # the token's string, as transformers' bos_token
            return self.tok.token_text(token_id)
        return self.tok.decode([token_id])

    def _render(self, messages: list[dict]) -> str:
        return render_chat_template(self.template, messages, add_generation_prompt=True, **self.template_tokens)

    def _new_ids(self, text: str) -> list[int]:
        """The ids to feed for a new user turn (after the previous reply)."""
        first = self.turns == 0
        unfed_stop = self.unfed is not None and self.unfed in self.stop_ids
        # A reply cut by max_new_tokens: its last token is reply text, not yet in the cache.
        ids: list[int] = [self.unfed] if self.unfed is not None and not unfed_stop else []
        if self.template is None:
            if first:
                return self.tok.encode(PLAIN_FIRST.format(text=text))
            return [self.unfed] * (self.unfed is not None) + encode_continuation(self.tok, PLAIN_NEXT.format(text=text))
        user = {"role": "user", "content": text}
        rendered = self._render(self.messages + [user])
        if first:
            # The template writes every special token itself (BOS included): transformers
            # tokenizes its output with add_special_tokens=False, and so do we.
            self.prompt_text = rendered
            return self.tok.encode(rendered, add_bos=False)
        delta, rewritten = self._delta(self.messages, self.prompt_text, user, rendered)
        if rewritten and self.unfed is not None:
            ids = [self.unfed]
        self.prompt_text = rendered
        return ids + encode_continuation(self.tok, delta) if delta else ids

    def _delta(self, messages: list[dict], prompt_text: str, user: dict, rendered: str) -> tuple[str, bool]:
        """The text a new user turn adds after the reply the cache holds (`rendered`: the
        conversation `messages` + `user`, rendered), and whether the template rewrites earlier turns."""
        said = prompt_text + messages[-1]["content"]  # what the cache holds, as text
        marked = self._render(messages[:-1] + [{"role": "assistant", "content": self.MARK}, user])
        before, mark, after = marked.partition(self.MARK)
        if rendered.startswith(said):
            # The template renders the reply as it was generated: the rest closes the reply (its
            # end-of-turn token, if the template writes one, is there as text) and opens the new turn.
            return rendered[len(said):], False
        if (mark and self.MARK not in after and before.startswith(prompt_text)
                and not before[len(prompt_text):].strip()):
            # The template alters the reply (trims it, strips a <think> block): the cache keeps the
            # reply as generated, and what the template puts after it is fed.
            return after, False
        # A template that rewrites earlier turns: the reply's stop token, then this turn on its own.
        system = [messages[0]] if messages[:1] and messages[0]["role"] == "system" else []
        return self._render(system + [user]), True

    PROBE = "\ue002minillm-next-turn\ue003"

    def _trim(self) -> None:
        """Keep only the history the next turn's rendering needs: the system message and the last
        exchange, when the template renders a next turn from them exactly as from the whole
        conversation (checked with a stand-in user text); otherwise everything. So `messages` and
        `prompt_text` stay bounded in a conversation of any length, as the cache does."""
        system = self.messages[:1] if self.messages[:1] and self.messages[0]["role"] == "system" else []
        if len(self.messages) - len(system) <= 2:
            return
        trimmed = system + self.messages[-2:]
        if self.template is None:  # the plain format renders each turn alone
            self.messages = trimmed
            return
        probe = {"role": "user", "content": self.PROBE}
        try:
            want = self._delta(self.messages, self.prompt_text, probe, self._render(self.messages + [probe]))
            short = self._render(trimmed[:-1])
            if self._delta(trimmed, short, probe, self._render(trimmed + [probe])) == want:
                self.messages, self.prompt_text = trimmed, short
        except MiniLLMError:  # a template that refuses the shorter history: keep it all
            pass

    def turn(self, text, *, max_new_tokens=..., temperature=..., top_k=..., top_p=...) -> Iterator[str]:
        """Feed the user's `text`; yield the reply's text as it is generated.

        `text` may also be the conversation as chat messages ([{"role": ..., "content": ...}]), as
        transformers, mlx-lm and llama-cpp-python take it: the messages this session already holds,
        followed by one new user message (a fresh session may start with a system message). The
        keywords set this turn's sampling only (not given: the constructor's, which later turns keep).

        Stopping early (not reading the generator to its end) still records the reply so far, so
        the next turn continues the conversation the cache holds."""
        text = self._user_text(text)
        given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        settings = {**self.sampling, **{k: v for k, v in given.items() if v is not ...}}
        check_sampling(settings["temperature"], settings["top_k"], settings["top_p"])
        check_int("max_new_tokens", settings["max_new_tokens"], 0, none_ok=True)
        if self.cache.batch_size > 1:  # a row of a shared cache: the batched turn, with only this session
            saved, self.sampling = self.sampling, settings
            try:
                yield from (piece for _, piece in chat_turns({self: text}))
            finally:
                self.sampling = saved
            return
        reply = self.begin_turn(text)
        try:
            for token in generate(self.model, reply.ids, cache=self.cache, generator=self.generator, **settings):
                piece = reply.push(token)
                if piece is None:
                    break
                if piece:
                    yield piece
            tail = reply.flush()
            if tail:
                yield tail
        finally:
            reply.close()

    def _user_text(self, text) -> str:
        """A turn's user text: `text` itself, or the new user message of a list of chat messages."""
        if isinstance(text, str) or not isinstance(text, (list, tuple)):
            return text  # begin_turn checks it
        messages = list(text)
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):
            raise MiniLLMError("chat messages must be {'role': str, 'content': str} dicts")
        held = self.messages  # the conversation so far, or its end that the session keeps (_trim)
        if not self.turns and not held and messages[:1] and messages[0]["role"] == "system" and len(messages) == 2:
            if self.template is None:
                raise MiniLLMError("a system prompt needs a chat template to render it, and this chat has none")
            self.messages = held = [dict(messages[0])]
        system = held[:1] if held[:1] and held[0]["role"] == "system" else []
        body = held[len(system):]
        given = [dict(m) for m in messages[:-1]]
        so_far = len(system) + 2 * self.turns  # every turn added a user message and a reply
        if (len(given) != so_far or given[: len(system)] != system or given[so_far - len(body):] != body
                or messages[-1]["role"] != "user"):
            raise MiniLLMError(f"chat messages must be this session's conversation so far ({so_far} messages) "
                               f"followed by one new user message; got {len(messages)} messages")
        return messages[-1]["content"]

    def begin_turn(self, text: str) -> Reply:
        """Start a turn: the ids to feed for `text` and the reply's bookkeeping (`Reply`). The
        batched turns (`chat_turns`) use it too, so every session renders its turns alike."""
        if self.closed:
            raise MiniLLMError("this ChatSession is closed (its cache row was released)")
        if not isinstance(text, str):
            raise MiniLLMError(f"a chat turn must be a string, got {type(text).__name__}")
        ids = self._new_ids(text)
        self.unfed = None
        return Reply(self, text, ids)

    def save(self, path) -> None:
        """Write the conversation (its stream in the cache, its history, settings and generator) to
        one safetensors file, atomically; `ChatSession.load` continues it bit-identically
        (minillm/apps/state.py)."""
        from .state import save_session

        save_session(self, path)

    @classmethod
    def load(cls, path, model, tokenizer) -> ChatSession:
        """A session (with a cache of its own) continuing the one `save` wrote, refused unless the
        model has the same config and weights and the tokenizer the same chat template."""
        from .state import load_session

        return load_session(cls, path, model, tokenizer)

    def sampler(self) -> Sampler:
        """This turn's sampling (the session's settings, its one generator across turns), as
        `generate(**self.sampling, generator=self.generator)` samples."""
        return make_sampler(self.model, generator=self.generator, **self.sampling)


class Reply:
    """One reply of a ChatSession as it is generated: its incremental decoder and its text so far.

    `push(token)` for each token drawn (the token becomes the session's `unfed`: the next turn
    feeds it first, or renders the stop it stands for); `close()` records the turn, also when the
    reply stopped early, so the session's history is what its cache holds."""

    def __init__(self, session: ChatSession, text: str, ids: list[int]):
        self.session, self.text, self.ids = session, text, ids
        self.decoder = session.tok.decoder(start_of_text=False)
        self.pieces: list[str] = []
        self.fed = False  # the prompt went through the cache (a token was drawn after it)
        self.closed = False

    def push(self, token: int) -> str | None:
        """The text `token` adds to the reply ("" while a character is incomplete); None for the
        stop token that ends it (EOS or end-of-turn), which adds no text."""
        s = self.session
        self.fed = True
        s.unfed = token
        if token in s.stop_ids and not s.sampling["ignore_eos"]:
            return None
        piece = self.decoder.push(token)
        if piece:
            self.pieces.append(piece)
        return piece

    def flush(self) -> str:
        """The reply's last text (a character held back by the decoder)."""
        tail = self.decoder.flush()
        if tail:
            self.pieces.append(tail)
        return tail

    def close(self) -> None:
        """Record the turn in the session (once), if its prompt reached the cache."""
        s = self.session
        if self.closed:
            return
        self.closed = True
        if self.fed or int(s.cache.tokens_seen[s.row]):
            self.flush()
            s.messages += [{"role": "user", "content": self.text},
                           {"role": "assistant", "content": "".join(self.pieces)}]
            s.turns += 1
            s._trim()


# ----------------------------------------------------------------------------------------------
# Conversations sharing one cache


def chat_turns(turns: Mapping[ChatSession, str]) -> Iterator[tuple[ChatSession, str]]:
    """One turn of each given session, run together; yield (session, text piece) as replies come.

    The sessions must share one cache (`ChatSession(..., cache=, row=)`), each in its own row.
    Every session renders its turn as `ChatSession.turn` does (`begin_turn`), the new ids of all
    go through one ragged prefill, and the replies decode in the same batched steps, each with
    its own sampling; sessions not given are not touched. Nothing is fed unless every session's
    turn renders and checks; stopping early records each reply so far, as `turn` does."""
    sessions = list(turns)
    if not sessions:
        return
    if any(not isinstance(s, ChatSession) for s in sessions):
        raise MiniLLMError("chat_turns: the keys must be ChatSessions")
    cache = sessions[0].cache
    if any(s.cache is not cache for s in sessions) or len({s.row for s in sessions}) < len(sessions):
        raise MiniLLMError("chat_turns: the sessions must share one cache, each in its own row")
    model = sessions[0].model
    replies: dict[ChatSession, Reply] = {}
    rows: list[Row] = []
    saved = [(s, s.prompt_text, s.unfed) for s in sessions]
    try:  # render and check every turn before anything is fed
        for s in sessions:
            replies[s] = reply = s.begin_turn(turns[s])
            seen = int(cache.tokens_seen[s.row])
            rows.append(Row(s, f"session row {s.row}", s.sampler(), new_stream_ids(model, reply.ids, seen),
                             new_stream=False))
    except BaseException:
        for s, prompt_text, unfed in saved:
            s.prompt_text, s.unfed = prompt_text, unfed
        raise
    by_row = {r.key.row: r for r in rows}
    try:
        for row, token, stop in run_rows(model, cache, lambda b: by_row.pop(b, None)):
            s, reply = row.key, replies[row.key]
            if token is None:  # max_new_tokens=0: the turn was fed, no token drawn
                continue
            piece = reply.push(token)
            if piece:
                yield s, piece
            if stop or piece is None:
                tail = reply.flush()
                if tail:
                    yield s, tail
    finally:
        for reply in replies.values():
            reply.close()


class ChatSessions:
    """`n` conversations over one shared cache of `n` rows, one row each.

        chats = minillm.ChatSessions(model, tok, 4, window=1020, temperature=0)
        for i, piece in chats.turns({0: "Hello!", 2: "What is the capital of France?"}):
            ...

    Every keyword is `ChatSession`'s; session i samples from `seed + i`, so session i's fed ids
    and replies are those of `ChatSession(model, tok, seed=seed + i, ...)` having the same
    conversation alone. `chats[i]` is session i (a `ChatSession`; `chats[i].turn(text)` runs a
    turn of it alone, in its row). `turns` runs one turn of each session given, together.
    """

    def __init__(self, model, tokenizer, n: int, *, sinks: int = 4, window: int = 1020, seed: int = 0,
                 positions: str = "cache", **settings):
        check_model(model)
        check_tokenizer(tokenizer)
        check_int("n", n, 1)
        check_seed(seed)
        self.cache = model.new_cache(batch_size=n, sinks=sinks, window=window, positions=positions)
        self.sessions = [ChatSession(model, tokenizer, cache=self.cache, row=i, seed=row_seed(seed, i), **settings)
                         for i in range(n)]

    def __len__(self) -> int:
        return len(self.sessions)

    def close(self) -> None:
        """Close every session (each releases its row)."""
        for s in self.sessions:
            s.close()

    def __enter__(self) -> ChatSessions:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, i: int) -> ChatSession:
        return self.sessions[i]

    def turns(self, texts: Mapping[int, str]) -> Iterator[tuple[int, str]]:
        """One turn of each session i in `texts` ({i: user text}), together; yield (i, piece)."""
        if not isinstance(texts, Mapping):
            raise MiniLLMError(f"turns takes a mapping {{session index: text}}, got {type(texts).__name__}")
        for i in texts:
            check_int("session index", i, 0, len(self.sessions) - 1, hint=f" ({len(self.sessions)} sessions)")
        index = {self.sessions[i]: i for i in texts}
        for session, piece in chat_turns({self.sessions[i]: text for i, text in texts.items()}):
            yield index[session], piece
