"""The ids that end a model's reply: its EOS ids and its chat template's end-of-turn token.

`minillm.load` records them as `model.eos_ids`, and `generate`, `generate_batch`,
`stream_generate` and `ChatSession` stop on them unless given other `eos_ids` (`eos_ids=()`: none).
They come from every place a checkpoint states them, as transformers and llama.cpp read them:
- a directory: config.json's and generation_config.json's `eos_token_id` (an id or a list),
  tokenizer_config.json's `eos_token`, and the end-of-turn token its chat template writes
  (`<|im_end|>` for ChatML), looked up among the added tokens;
- a GGUF file: `tokenizer.ggml.eos_token_id`, `tokenizer.ggml.eot_token_id` and the template's
  end-of-turn token in `tokenizer.ggml.tokens`.
Ids outside the vocabulary are left out (they can never be sampled); a file that cannot be read
is refused with one line naming it, as loading its tokenizer would refuse it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .reading import is_present, read_json, read_text_file

# End-of-turn tokens of common chat formats: a reply stops on these too, when the template writes them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _json(path: Path) -> dict[str, Any]:
    # Read as every other input file is (refused by kind, size and nesting, with one line naming it).
    data = read_json(path, what=path.name, optional=True, expect_object=False)
    return data if isinstance(data, dict) else {}


def _ids(value: Any, vocab_size: int) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size]


def template_end_tokens(template: Any) -> list[str]:
    """The end-of-turn token strings a chat template writes."""
    if isinstance(template, list):  # tokenizer_config.json's named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return [t for t in END_OF_TURN if isinstance(template, str) and t in template]


def directory_stop_ids(d: Path, vocab_size: int) -> frozenset[int]:
    """The stop ids a checkpoint directory states (the module docstring)."""
    d = Path(d)
    found = _ids(_json(d / "config.json").get("eos_token_id"), vocab_size)
    found += _ids(_json(d / "generation_config.json").get("eos_token_id"), vocab_size)
    tok_cfg = _json(d / "tokenizer_config.json")
    jinja = d / "chat_template.jinja"
    template = read_text_file(jinja, what="chat template", encoding="utf-8") if is_present(jinja) \
        else tok_cfg.get("chat_template")
    wanted = template_end_tokens(template)
    eos = tok_cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str):
        wanted.append(eos)
    if wanted:
        by_text: dict[str, int] = {}
        decoder = tok_cfg.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for i, t in decoder.items():
                if isinstance(t, dict) and isinstance(t.get("content"), str) and str(i).isdigit():
                    by_text.setdefault(t["content"], int(i))
        if any(w not in by_text for w in wanted):
            for t in _json(d / "tokenizer.json").get("added_tokens") or []:
                if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int):
                    by_text.setdefault(t["content"], t["id"])
        found += _ids([by_text[w] for w in wanted if w in by_text], vocab_size)
    return frozenset(found)


def gguf_stop_ids(meta: dict[str, Any], vocab_size: int) -> frozenset[int]:
    """The stop ids a GGUF file's metadata states (the module docstring)."""
    found = _ids([meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")], vocab_size)
    wanted = template_end_tokens(meta.get("tokenizer.chat_template"))
    tokens = meta.get("tokenizer.ggml.tokens")
    if wanted and isinstance(tokens, list):
        index = {t: i for i, t in enumerate(tokens) if t in wanted}
        found += _ids([index[w] for w in wanted if w in index], vocab_size)
    return frozenset(found)
