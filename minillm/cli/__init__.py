"""The `minillm` command line: a thin layer over the library.

    minillm generate [MODEL] --prompt TEXT        stream text from a fixed-size sink+window cache
    minillm chat     [MODEL] [--prompts F.jsonl]  a conversation over one persistent cache
    minillm batch    [MODEL] --input F.jsonl      many prompts at once (continuous batching), JSONL out
    minillm ppl      [MODEL] --text FILE [...]    long-text perplexity: streaming/window/recompute/dense
    minillm attn     [MODEL] --text FILE --png P  attention maps and per-layer attention-sink scores
    minillm serve    [MODEL] [--port 8000]        an OpenAI-compatible HTTP server (the serve extra)

MODEL is a local checkpoint directory, a hub repo id or a .gguf file (also as `-m/--model`);
without it, the shipped default `weights/llama-tiny` (an installed wheel's copy, minillm/data/).
Without `--text`, ppl and attn read the shipped sample text (minillm/data/sample.txt); `-` is
stdin. The cache is `--sinks N` plus a window, `--cache-size S` keys in all (the new token
included), as in the library's `new_cache(sinks=N, window=S-N)`. mlx-lm's and llama.cpp's
spellings work: `-p` (--prompt), `-n` and `--max-tokens` (--max-new-tokens; ppl's --max-tokens
is the scored length), and the common options may come before the subcommand.

Progress (status.py): on a terminal, one status line on stderr redrawn in place during the long
phases and erased after them; nothing when stderr is not a terminal. A closing summary either way.

Bad input is one line on stderr (`minillm: error: ...`) and exit code 2; Ctrl-C exits with 130
(SIGTERM: 143) and no traceback (`ppl` first prints what it scored so far).

Text rule: every text (`--prompt`, `--prompt-file`, `--text`, chat turns from a file or stdin)
must be valid UTF-8. Invalid bytes or lone surrogates are refused, naming where and the offset;
nothing is silently replaced. Outputs (`--json`, `--plot`, `--png`, `--output`) are checked before the work,
never overwrite an input, and a file is written atomically (a temporary file renamed into place);
a stream (/dev/stdout, /dev/fd/N, a FIFO, a terminal) is written in place, never renamed over.

    parser.py    the arguments          commands.py  the commands and `main`
    status.py    the status line
    files.py     the text rule; outputs checked first and written atomically
    jsonl.py     the JSONL prompts, turns and records of chat and batch
"""

from .commands import main

__all__ = ["main"]
