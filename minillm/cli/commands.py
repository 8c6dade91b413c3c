"""The commands: each reads its inputs, loads the model, runs the library, and writes its outputs.

    generate  minillm.generate          chat  minillm.ChatSession     batch  minillm.generate_batch
    ppl       minillm.evaluate.perplexity                              attn   attention maps, sink scores
    serve     minillm.Engine behind FastAPI and uvicorn (minillm/serve/)

Arguments are minillm/cli/parser.py; safe reading and writing of files is minillm/cli/files.py
(the text rule, outputs checked first and written atomically); the JSONL inputs and outputs are
minillm/cli/jsonl.py. `main` turns every MiniLLMError into one line and exit code 2.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

from ..data import SAMPLE_TEXT, default_model
from ..errors import MiniLLMError
from ..progress import reporting
from .files import check_outputs, check_text, flush_print, need_matplotlib, save_figure, write_json
from .jsonl import PROMPT_KEYS, Records, read_prompts, read_turns, stdin_turns
from .parser import DEFAULT_CACHE_SIZE, build_parser, finish, hoist_global_options
from .status import STATUS, PhaseReporter

# The wheel's copy of weights/llama-tiny, or the clone's (minillm/data/__init__.py).
DEFAULT_MODEL = default_model()
SAMPLE_NAME = "the shipped sample (the opening of Frankenstein)"


def _warn(message: str) -> None:
    STATUS.clear()
    print(f"minillm: warning: {message}", file=sys.stderr)


def _load(args):
    """(model, tokenizer) named by args.model, or the shipped default; any failure is one line."""
    import torch

    import minillm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_fast:
        for flag in ("int8", "compile"):
            if getattr(args, flag, False):
                raise MiniLLMError(f"--no-fast runs the core alone; --{flag} belongs to the fast layer (drop one of them)")
    name = args.model
    if name is None:
        if not DEFAULT_MODEL.is_dir():
            raise MiniLLMError(f"no MODEL given and the default checkpoint {DEFAULT_MODEL} is missing")
        name = str(DEFAULT_MODEL)
    # A local file or directory by its name (the line must fit a terminal), a hub repo id as given.
    label = f"minillm: loading {Path(name).name if Path(name).exists() else name}"
    STATUS.show(label + " ...", every=0)
    # A GGUF file's tensors are dequantized as they are read: the long part of its load.
    verb = "dequantizing tensor" if str(name).lower().endswith(".gguf") else "tensor"
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught, reporting(PhaseReporter(label, {"tensors": verb})):
            warnings.simplefilter("always", minillm.ConfigWarning)
            model = minillm.load(name, dtype=args.dtype, device=args.device, strict=args.strict_config,
                                 fast=not args.no_fast, tensor_parallel=getattr(args, "tensor_parallel", False))
            STATUS.show(label + ": tokenizer ...", every=0)
            tok = minillm.load_tokenizer(name)
        STATUS.clear()
        for w in caught:  # one line each, as every other warning of the CLI
            if issubclass(w.category, minillm.ConfigWarning):
                _warn(" ".join(str(w.message).split()) + " (--strict-config refuses them)")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except MiniLLMError:
        raise
    except Exception as e:  # a corrupt file can raise anything; the user needs one line, not a trace
        first = (str(e).strip().splitlines() or [""])[0]
        raise MiniLLMError(f"cannot load model {name}: {type(e).__name__}: {first}") from None
    model.eval()
    if getattr(args, "int8", False):
        from ..fast.quant import quantize_int8

        STATUS.show(label + ": int8 weights ...", every=0)
        quantize_int8(model)
    if getattr(args, "compile", False):
        from ..fast import compile_decode

        compile_decode(model)
    STATUS.clear()
    args.load_seconds = time.perf_counter() - start
    return model, tok


def _context_source(model) -> str:
    """Where a loaded model's trained context came from: the GGUF key or the config.json key."""
    from ..formats.gguf import is_gguf

    source = getattr(model, "source", "") or ""
    if is_gguf(source):
        return f"{Path(source).name}'s llama.context_length"
    key = {"mpt": "max_seq_len"}.get(model.config.family, "max_position_embeddings")
    return f"config.json's {key}"


def _compile_note(args) -> None:
    """--compile compiles at the first decode steps, not at load: say so before the wait."""
    if getattr(args, "compile", False):
        print("minillm: --compile: torch.compile compiles the decode step at its first calls (tens of seconds; "
              "once more when the cache fills)", file=sys.stderr)


def _cache_shape(args, model, rows: int = 1) -> tuple[int, int]:
    """(sinks, window) from --sinks and --cache-size, with the trained-context warning; the cache
    of `rows` streams must fit in memory."""
    trained = model.config.max_position_embeddings
    S = args.cache_size if args.cache_size is not None else min(DEFAULT_CACHE_SIZE, trained)
    if S <= args.sinks and args.cache_size is None:  # the default: the checkpoint's context is the cause
        raise MiniLLMError(f"the checkpoint's trained context, {_context_source(model)} = {trained}, leaves no room "
                           f"for a window after --sinks {args.sinks} (the default --cache-size is the smaller of "
                           f"{DEFAULT_CACHE_SIZE} and that context); give --cache-size above {args.sinks}, or fewer --sinks")
    if S <= args.sinks:
        raise MiniLLMError(f"--cache-size must exceed --sinks (got --cache-size {S}, --sinks {args.sinks}): "
                           f"the window needs at least one slot")
    import torch

    from ..limits import cache_bytes, check_fits

    what = f"--cache-size {S}: a KV cache of {S} keys" if rows == 1 else \
        f"--batch-size {rows} --cache-size {S}: a KV cache of {rows} x {S} keys"
    check_fits(cache_bytes(model.config, rows, args.sinks, S - args.sinks, torch.finfo(model.dtype).bits // 8),
               model.device, what)
    if S > trained:
        _warn(f"--cache-size {S} exceeds the checkpoint's trained context ({trained} positions); "
              f"positions past it were never trained")
    return args.sinks, S - args.sinks


def _max_new(args) -> int | None:
    return None if args.max_new_tokens == -1 else args.max_new_tokens


# ----------------------------------------------------------------------------------------------
# generate


def cmd_generate(args) -> int:
    from ..apps.generation import generate
    from ..formats.text import read_text

    if args.prompt is not None:
        prompt = check_text(args.prompt, "--prompt")
    else:
        prompt = read_text(args.prompt_file, gutenberg=False)
    if not prompt:
        raise MiniLLMError("the prompt is empty")
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    ids = tok.encode(prompt)
    decoder = tok.decoder(start_of_text=False)  # the output continues the prompt
    _compile_note(args)
    n, interrupted, start = 0, False, time.perf_counter()
    # A prompt whose prefill runs past 2 s shows its progress; the summary times prefill and decode apart.
    phases = PhaseReporter("minillm: prompt", {"prefill": "prefill, token"}, after={"prefill": 2.0})
    try:
        with reporting(phases):
            for token in generate(model, ids, max_new_tokens=_max_new(args),
                                  temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                                  seed=args.seed, sinks=sinks, window=window, eos_ids=tok.eos_ids,
                                  ignore_eos=args.ignore_eos, vocab_size=tok.vocab_size, positions=args.positions):
                STATUS.clear()
                if token in tok.eos_ids and not args.ignore_eos:
                    break
                n += 1
                text = decoder.push(token)
                if text:
                    flush_print(text)
    except KeyboardInterrupt:
        interrupted = True
    STATUS.clear()
    flush_print(decoder.flush() + "\n")
    end = time.perf_counter()
    print("minillm: " + summary(n, start, phases.finished.get("prefill"), end, phases.totals.get("prefill", 0),
                                getattr(args, "load_seconds", 0.0))
          + f"; cache {sinks}+{window}{_positions_note(args)}{', interrupted' if interrupted else ''}", file=sys.stderr)
    return 130 if interrupted else 0


def _positions_note(args) -> str:
    """", absolute positions" in a summary line when --positions absolute (the default says nothing)."""
    return ", absolute positions" if getattr(args, "positions", "cache") == "absolute" else ""


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tokens/s" if seconds > 0 and tokens else "- tokens/s"


def summary(generated: int, start: float, prefilled: float | None, end: float, prompt_tokens: int,
            load_seconds: float) -> str:
    """The closing line's timings, decode and prefill apart (as llama.cpp and mlx_lm.generate
    report them): generated tokens and their rate from the end of the prefill (the first token's
    sampling included), the prompt's tokens and the prefill's rate, and the load time."""
    if prefilled is None:  # interrupted during the prefill
        return (f"{generated} tokens; prompt interrupted after {end - start:.2f} s; "
                f"load {load_seconds:.1f} s")
    decode, prefill = end - prefilled, prefilled - start
    return (f"{generated} tokens at {_rate(generated, decode)} ({decode:.2f} s); prompt {prompt_tokens} tokens "
            f"at {_rate(prompt_tokens, prefill)} ({prefill:.2f} s); load {load_seconds:.1f} s")


def cmd_chat(args) -> int:
    from ..apps.chat import ChatSession

    turns = read_turns(args.prompts) if args.prompts is not None else None
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    _compile_note(args)
    session = ChatSession(model, tok, sinks=sinks, window=window, max_new_tokens=_max_new(args),
                          temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                          seed=args.seed, ignore_eos=args.ignore_eos, use_template=not args.no_template,
                          system=args.system, positions=args.positions)
    source = ((t, False) for t in turns) if turns is not None else stdin_turns()
    interrupted, start = False, time.perf_counter()
    try:
        for turn, echoed in source:
            if not echoed:
                flush_print(f"USER: {turn}\n")
            flush_print("ASSISTANT:")
            for piece in session.turn(turn):
                flush_print(piece)
            flush_print("\n")
    except KeyboardInterrupt:
        interrupted = True
        flush_print("\n")
    seconds = time.perf_counter() - start
    cache = session.cache
    print(f"minillm: {session.turns} turns, {int(cache.tokens_seen[0])} tokens through a cache of "
          f"{cache.sinks}+{cache.window}{_positions_note(args)} in {seconds:.1f} s"
          f"{' (chat template)' if session.template else ''}{', interrupted' if interrupted else ''}",
          file=sys.stderr)
    return 130 if interrupted else 0


# ----------------------------------------------------------------------------------------------
# batch


def _line_error(records: Records, lineno: int, message: str, line_id=None) -> None:
    """A malformed line: one line on stderr, and an error record in its place in the output."""
    print(f"minillm: error: {' '.join(message.split())}", file=sys.stderr)
    records.add(lineno, {"line": lineno, "id": line_id, "error": message})


def _prompt_form(args, model, tok):
    """(encode, stop ids) for batch's prompts. With the checkpoint's chat template (unless
    --no-chat-template), a prompt is one user turn with the generation prompt, encoded as
    `minillm chat` encodes its first turn, and a reply also stops at the template's end-of-turn
    token (mlx-lm's batch generation does the same); without one, the raw text."""
    from ..apps.chat import ChatSession, render_chat_template

    if args.no_template or not getattr(tok, "chat_template", None):
        return tok.encode, frozenset(tok.eos_ids)
    chat = ChatSession(model, tok, sinks=0, window=1)  # a one-slot cache: only its rendering is used

    def encode(prompt: str) -> list[int]:
        text = render_chat_template(chat.template, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    **chat.template_tokens)
        return tok.encode(text, add_bos=False)  # the template writes its special tokens itself
    return encode, chat.stop_ids


def _batch_jobs(args, name: str, good: list[tuple[int, dict]], tok, records: Records,
                encode=None) -> tuple[list, int]:
    """(line number, parsed line, Request) for each good line, and how many encode to nothing.

    A line's seed defaults to --seed + (line number - 1): it depends on the line alone, whatever
    the other lines hold, and the first line gets `minillm generate --seed S`'s stream."""
    from ..apps.batching import Request, row_seed

    jobs, empty = [], 0
    for lineno, p in good:
        ids = (encode or tok.encode)(p["prompt"])
        if not ids:
            empty += 1
            _line_error(records, lineno, f"{name}:{lineno}: the prompt encodes to no tokens", p["id"])
            continue
        settings = {"seed": p.get("seed", row_seed(args.seed, lineno - 1))}
        if "max_new_tokens" in p:
            settings["max_new_tokens"] = None if p["max_new_tokens"] == -1 else p["max_new_tokens"]
        if "temperature" in p:
            settings["temperature"] = p["temperature"]
        jobs.append((lineno, p, Request(ids, **settings)))
    return jobs, empty


def _run_batch(args, name: str, model, tok, jobs: list, records: Records,
               stop_ids=None) -> tuple[int, float, bool]:
    """Generate every job, a record as each finishes; (tokens generated, EOS not counted, seconds,
    interrupted)."""
    from tqdm import tqdm

    from ..apps.batching import generate_batch

    rows = min(args.batch_size, len(jobs))
    sinks, window = _cache_shape(args, model, rows)
    print(f"minillm: {len(jobs)} prompts from {name}, {rows} at a time through a cache of {sinks}+{window}"
          f"{_positions_note(args)}", file=sys.stderr)
    drawn: dict[int, list[int]] = {}
    tokens, interrupted, start = 0, False, time.perf_counter()
    bar = tqdm(total=len(jobs), unit="prompt", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        for index, token, stop in generate_batch(
                model, [r for _, _, r in jobs], batch_size=rows, max_new_tokens=_max_new(args),
                temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed,
                sinks=sinks, window=window, eos_ids=tok.eos_ids if stop_ids is None else stop_ids,
                ignore_eos=args.ignore_eos, vocab_size=tok.vocab_size, positions=args.positions):
            got = drawn.setdefault(index, [])
            if token is not None and stop != "eos":  # the EOS id ends the text; it is not part of it
                got.append(token)
                tokens += 1
            if stop is None:
                continue
            del drawn[index]
            lineno, p, _ = jobs[index]
            decoder = tok.decoder(start_of_text=False)  # the text continues the prompt
            text = "".join(decoder.push(t) for t in got) + decoder.flush()
            records.add(lineno, {"line": lineno, "id": p["id"], "prompt": p["prompt"], "text": text,
                                 "tokens": len(got), "stop": stop})
            bar.update(1)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s", refresh=False)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return tokens, time.perf_counter() - start, interrupted


def cmd_batch(args) -> int:
    inputs = [] if args.input == "-" else [args.input]
    if args.output != "-":
        check_outputs({"--output": args.output}, inputs, _model_dir(args))
    name, lines = read_prompts(args.input)
    records = Records(args.output, [n for n, _ in lines])
    bad, warned = 0, set()
    for lineno, parsed in lines:
        if isinstance(parsed, str):
            bad += 1
            _line_error(records, lineno, parsed)
            continue
        for key in parsed["unknown"]:
            if key not in warned:
                warned.add(key)
                _warn(f"{name}:{lineno}: ignoring the unknown key {key!r} (known: {', '.join(PROMPT_KEYS)})")
    good = [(n, p) for n, p in lines if not isinstance(p, str)]
    jobs, tokens, seconds, interrupted = [], 0, 0.0, False
    if good:
        model, tok = _load(args)
        encode, stop_ids = _prompt_form(args, model, tok)
        jobs, empty = _batch_jobs(args, name, good, tok, records, encode)
        bad += empty
        if jobs:
            tokens, seconds, interrupted = _run_batch(args, name, model, tok, jobs, records, stop_ids)
    records.finish()
    done = sum(1 for n, _, _ in jobs if n in records.done)
    print(f"minillm: {done} of {len(jobs)} prompts, {tokens} tokens in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s)" + (f"; {bad} malformed line(s)" if bad else "")
          + (", interrupted" if interrupted else ""), file=sys.stderr)
    return 130 if interrupted else 2 if bad else 0


# ----------------------------------------------------------------------------------------------
# ppl


def _fmt(x: float | None, width: int = 10) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}"


def _finite(x):
    return None if x is None or not math.isfinite(x) else x


def _model_dir(args) -> str:
    return str(DEFAULT_MODEL) if args.model is None else args.model


def _text_files(args) -> list[str]:
    """--text's files, or the shipped sample text without --text."""
    return list(args.text) if args.text else [str(SAMPLE_TEXT)]


def _read_texts(files: list[str]) -> str:
    """The files' texts concatenated, as minillm.formats.text.read_texts; "-" is stdin (once)."""
    from ..formats.text import read_stdin_text, read_text

    if files.count("-") > 1:
        raise MiniLLMError("--text: stdin ('-') can be given only once")
    return "\n\n".join(read_stdin_text() if f == "-" else read_text(f) for f in files)


def cmd_ppl(args) -> int:
    from ..apps.evaluate import check_dense, perplexity
    from ..apps.generation import sink_prefix

    modes = list(dict.fromkeys(args.mode))
    files = _text_files(args)
    check_outputs({"--json": args.json, "--plot": args.plot}, files, _model_dir(args), figures=("--plot",))
    if args.data_parallel:
        return _ppl_data_parallel(args, modes, files)
    plt = need_matplotlib("--plot") if args.plot else None
    text = _read_texts(files)
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    ids = tok.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise MiniLLMError(f"the text is {len(ids)} token(s) long; perplexity needs at least 2")
    if "dense" in modes:  # refuse before spending time on the other modes
        check_dense(model, len(ids) - 1 + len(sink_prefix(model.config)), args.dense_max_tokens)
    S = sinks + window
    source = f"{len(files)} file(s)" if args.text else SAMPLE_NAME
    print(f"minillm: {len(ids)} tokens from {source}; cache {sinks}+{window} (S={S}){_positions_note(args)}; "
          f"modes: {' '.join(modes)}", file=sys.stderr)

    results = {}
    for mode in modes:
        r = perplexity(model, ids, mode, sinks, window, stride=args.stride, seed=args.seed,
                       exact_loop=args.exact_loop, progress=True, dense_max_tokens=args.dense_max_tokens,
                       interruptible=True, positions=args.positions)
        results[mode] = r
        if r.interrupted:
            break
    interrupted = any(r.interrupted for r in results.values())

    strided = args.stride is not None
    head = f"{'mode':<10} {'tokens':>8} {'PPL':>10}" + (f" {'PPL@stride':>10}" if strided else "") + f" {'tokens/s':>10}"
    lines = [head]
    for mode, r in results.items():  # "-": nothing scored (never a NaN standing in for it)
        ppl = r.ppl if r.tokens else None
        ppl_strided = r.ppl_strided if (strided and int((r.subset & r.scored).sum())) else None
        rate = f"{r.tokens_per_s:>10.0f}" if r.tokens and r.seconds > 0 else f"{'-':>10}"
        row = f"{mode:<10} {r.tokens:>8} {_fmt(ppl)}" + (f" {_fmt(ppl_strided)}" if strided else "")
        lines.append(row + f" {rate}" + ("  (interrupted)" if r.interrupted else ""))
    if strided:
        first = next(iter(results.values()))
        lines.append(f"stride {args.stride}, offset {first.offset}: PPL@stride is over the same "
                     f"{int(first.subset.sum())} tokens in every mode")
    flush_print("\n".join(lines) + "\n")

    if args.json:
        out = {"model": args.model or str(DEFAULT_MODEL), "files": files, "tokens": len(ids),
               "sinks": sinks, "cache_size": S, "positions": args.positions, "dtype": args.dtype,
               "exact_loop": args.exact_loop,
               "modes": {}}
        if strided:
            first = next(iter(results.values()))
            out.update(stride=args.stride, offset=first.offset, seed=args.seed)
        for mode, r in results.items():
            d = {k: _finite(v) if isinstance(v, float) else v for k, v in r.summary().items()}
            d["nll_curve"] = r.nll_curve()
            out["modes"][mode] = d
        if interrupted:
            out["interrupted"] = True
        write_json(args.json, "--json", out)
    if plt is not None:
        from ..apps.plots import running_ppl_figure

        curves = {f"{mode} (PPL {r.ppl:.2f})": r.nll_curve() for mode, r in results.items() if r.tokens}
        title = f"{Path(args.model or DEFAULT_MODEL).name}: cache {sinks}+{window}"
        fig = running_ppl_figure(plt, curves, S, model.config.max_position_embeddings, len(ids), title)
        save_figure(plt, fig, args.plot, "--plot", dpi=120)
    return 130 if interrupted else 0


def _ppl_data_parallel(args, modes: list[str], files: list[str]) -> int:
    """`ppl --data-parallel`: each file is its own stream, the files split over the ranks (file i to
    rank i mod W), and the NLL sums gathered: PPL = exp(total NLL / total tokens), summed in file
    order, so the numbers are the same at any W, one process included."""
    from ..apps.evaluate import check_dense, perplexity
    from ..apps.generation import sink_prefix
    from ..parallel.cli import gather, pooled_ppl, rank_world

    for flag, value in (("--stride", args.stride), ("--plot", args.plot)):
        if value is not None:
            raise MiniLLMError(f"--data-parallel pools whole files; {flag} is for one stream (drop one of them)")
    rank, world = rank_world()
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model)
    print(f"minillm: {len(files)} file(s) over {world} rank(s); cache {sinks}+{window}; modes: {' '.join(modes)}",
          file=sys.stderr)
    mine = []
    for i in range(rank, len(files), world):
        ids = tok.encode(_read_texts([files[i]]))
        if args.max_tokens:
            ids = ids[: args.max_tokens]
        if len(ids) < 2:
            raise MiniLLMError(f"{files[i]}: the text is {len(ids)} token(s) long; perplexity needs at least 2")
        if "dense" in modes:
            check_dense(model, len(ids) - 1 + len(sink_prefix(model.config)), args.dense_max_tokens)
        for mode in modes:
            r = perplexity(model, ids, mode, sinks, window, seed=args.seed, exact_loop=args.exact_loop,
                           dense_max_tokens=args.dense_max_tokens)
            mine.append((i, mode, float(r.nll[r.scored].sum()), r.tokens, r.ppl))
    rows = sorted(gather(mine))
    lines = [f"{'mode':<10} {'file':<24} {'tokens':>8} {'PPL':>10}"]
    out = {"model": args.model or str(DEFAULT_MODEL), "files": files, "ranks": world, "sinks": sinks,
           "cache_size": sinks + window, "dtype": args.dtype, "modes": {}}
    for mode in modes:
        mode_rows = [r for r in rows if r[1] == mode]
        total, tokens = 0.0, 0
        for i, _, nll_sum, n, ppl in mode_rows:  # in file order
            total += nll_sum
            tokens += n
            lines.append(f"{mode:<10} {Path(files[i]).name[:24]:<24} {n:>8} {_fmt(_finite(ppl))}")
        pooled = pooled_ppl(total, tokens)
        lines.append(f"{mode:<10} {'(all files)':<24} {tokens:>8} {_fmt(_finite(pooled))}")
        out["modes"][mode] = {"ppl": _finite(pooled), "tokens": tokens, "nll_sum": total,
                              "files": [{"file": files[i], "tokens": n, "ppl": _finite(ppl), "nll_sum": s}
                                        for i, _, s, n, ppl in mode_rows]}
    flush_print("\n".join(lines) + "\n")
    if args.json:
        write_json(args.json, "--json", out)
    return 0


# ----------------------------------------------------------------------------------------------
# attn


def cmd_attn(args) -> int:
    from ..apps.attention_maps import attention_maps, attention_probs, attention_sink_scores
    from ..apps.generation import sink_prefix

    files = _text_files(args)
    check_outputs({"--png": args.png, "--json": args.json}, files, _model_dir(args), figures=("--png",))
    plt = need_matplotlib("--png")
    text = _read_texts(files)
    model, tok = _load(args)
    ids = tok.encode(text)
    T = min(args.tokens, len(ids) + len(sink_prefix(model.config)))
    if T < 2:
        raise MiniLLMError(f"the text is {len(ids)} token(s) long; attention maps need at least 2")
    if T < args.tokens:
        _warn(f"the text has only {T} tokens; mapping those")
    if args.min_query is not None and args.min_query >= T:
        raise MiniLLMError(f"--min-query {args.min_query} must be below the number of tokens ({T})")
    if not args.text:
        print(f"minillm: {T} tokens from {SAMPLE_NAME}", file=sys.stderr)
    probs = attention_probs(model, ids, T)
    maps = attention_maps(model, ids, probs=probs)
    scores = attention_sink_scores(model, ids, min_query=args.min_query, probs=probs)

    lines = [f"attention on token 0 from queries {scores.min_query}..{T - 1} (uniform would be "
             f"{scores.uniform:.4f})", f"{'layer':>5} {'mean':>8} {'max head':>9}"]
    for i, (m, h) in enumerate(zip(scores.per_layer, scores.strongest_head)):
        lines.append(f"{i:>5} {m:>8.4f} {h:>9.4f}")
    flush_print("\n".join(lines) + "\n")
    if args.json:
        out = {"model": args.model or str(DEFAULT_MODEL), "files": files, **scores.to_dict()}
        write_json(args.json, "--json", out)
    from ..apps.plots import attention_map_figure

    title = f"{Path(args.model or DEFAULT_MODEL).name}: first {maps.shape[1]} tokens"
    fig = attention_map_figure(plt, maps, scores.per_layer, title)
    save_figure(plt, fig, args.png, "--png", dpi=110)
    return 0


# ----------------------------------------------------------------------------------------------
# serve


def _wants_group(args) -> bool:
    return bool(getattr(args, "tensor_parallel", False) or getattr(args, "data_parallel", False))


def cmd_serve(args) -> int:
    import importlib.util
    import os

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MiniLLMError(f"minillm serve needs {' and '.join(missing)}: pip install \"minillm-sinks[serve]\"")
    if args.api_key is None:
        args.api_key = os.environ.get("MINILLM_API_KEY") or None
    if args.api_key is not None and not args.api_key.strip():
        raise MiniLLMError("--api-key is empty")
    if args.session_dir is not None:
        d = Path(args.session_dir)
        if d.exists() and not d.is_dir():
            raise MiniLLMError(f"--session-dir {d} exists and is not a directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MiniLLMError(f"--session-dir {d}: cannot create it ({e.strerror or e})") from None
    if args.queue_size is None:
        args.queue_size = 4 * args.batch_size
    from ..serve.server import bind

    bind(args.host, args.port).close()  # a port in use is refused before the model loads
    model, tok = _load(args)
    sinks, window = _cache_shape(args, model, args.batch_size)
    _compile_note(args)
    from ..serve.server import run_server

    return run_server(args, model, tok, sinks, window)


# ----------------------------------------------------------------------------------------------


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "batch": cmd_batch, "ppl": cmd_ppl, "attn": cmd_attn,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(hoist_global_options(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as e:  # --help, --version, or a one-line usage error
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        try:
            parser.print_help()
        except SystemExit as e:  # stdout failed (/dev/full): one line on stderr
            return e.code if isinstance(e.code, int) else 2
        return 0
    for stream in (sys.stdout, sys.stderr):  # a model can sample bytes a console cannot show
        if stream is not None and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="replace")
            except (ValueError, OSError):  # a closed stream
                pass
    try:
        finish(args)
        if args.command == "serve" and args.tensor_parallel:
            raise MiniLLMError("serve runs in one process: --tensor-parallel is not supported there "
                               "(use it with generate, chat, batch or ppl)")
        if _wants_group(args):  # torchrun: --tensor-parallel, ppl --data-parallel (minillm/parallel/cli.py)
            from ..parallel.cli import start

            start(args)
        return COMMANDS[args.command](args)
    except MiniLLMError as e:
        STATUS.clear()
        print(f"minillm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        STATUS.clear()
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minillm generate ... | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if _wants_group(args):
            from ..parallel.cli import stop

            stop()
