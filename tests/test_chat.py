"""Chat templates: where they are found, and what a ChatSession feeds, against transformers.

transformers' `apply_chat_template(messages, add_generation_prompt=True)` is the oracle. A
ChatSession feeds only the new tokens each turn; over a conversation, everything it fed (every
prompt, every reply token) must be the token ids transformers tokenizes for the whole
conversation. Replies are scripted (a stand-in model emits fixed tokens) so that the check is
exact and fast; the templates and tokenizers are real: SmolLM2's own ChatML (from its GGUF and
its converted directory, in tests/test_smollm2.py), Llama-2's [INST] template with a system
prompt on two tokenizer kinds, and a list of named templates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import minillm
from minillm.apps.chat import ChatSession, encode_continuation
from util import Scripted, tiny_config

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-2-chat's published template.
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
NAMED = [{"name": "tool_use", "template": "{{ 'tools!' }}"},
         {"name": "default", "template": "{% for m in messages %}### {{ m['role'] }}:{{ m['content'] }}\n"
                                         "{% endfor %}{% if add_generation_prompt %}### assistant:{% endif %}"}]

USERS = ["Hello there!", "What is the capital of France?", "  Tell me more, please.  ", "Thanks; bye."]


def _hf_tokenizer(d: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(d))


def check_conversation(tok, hf, replies: list[str], *, system: str | None = None, stop: int | None = None):
    """Run len(replies) turns with scripted replies; the fed ids must be transformers' ids of the
    whole conversation, and each rendering equal to apply_chat_template's."""
    stop = tok.eos_id if stop is None else stop
    # What the model would emit for each reply: the tokens of the text that follows the generation
    # prompt in transformers' rendering of the whole conversation, up to the end-of-turn token.
    script = []
    for r in replies:
        script += encode_continuation(tok, r) + [stop]
    script += [stop]  # the last turn's reply is empty
    model = Scripted(tok.vocab_size, script)
    chat = ChatSession(model, tok, temperature=0, system=system, max_new_tokens=1000)
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, reply in zip(USERS, replies + [""]):
        got = "".join(chat.turn(user))
        messages += [{"role": "user", "content": user}]
        # The session keeps only the history its next turn needs (the system message and the last
        # exchange, where the template allows), rendered as transformers renders it.
        want_text = hf.apply_chat_template(chat.messages[:-1], add_generation_prompt=True, tokenize=False)
        assert chat.prompt_text == want_text
        assert chat.messages[-2:] == [{"role": "user", "content": user}, {"role": "assistant", "content": got}]
        messages += [{"role": "assistant", "content": got}]
        assert got == reply
    # Everything fed, minus the final stop token (generated, not yet fed), against the oracle.
    want = hf.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(want, dict) or hasattr(want, "input_ids"):
        want = want["input_ids"]
    assert model.fed == list(want)
    return model.fed


def _with_template(src: Path, tmp: Path, template, **extra) -> Path:
    d = tmp / "tok"
    shutil.copytree(src, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(chat_template=template, **extra)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_llama2_template_with_system_prompt_sentencepiece(tmp_path):
    d = _with_template(WEIGHTS / "llama-tiny", tmp_path, LLAMA2)
    tok, hf = minillm.load_tokenizer(d), _hf_tokenizer(d)
    assert tok.backend == "sentencepiece"
    # Llama-2 renders a reply as ' ' + content.strip() + ' ' + eos: a reply of " Paris. " is that.
    fed = check_conversation(tok, hf, [" Hi! ", " Paris. ", " It is large. "], system="Be brief.")
    assert fed.count(tok.bos_id) == len(USERS)  # one <s> per [INST] block, as the template writes


def test_llama2_template_with_system_prompt_byte_level(tmp_path):
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, LLAMA2)
    tok, hf = minillm.load_tokenizer(d), _hf_tokenizer(d)
    check_conversation(tok, hf, [" Hi! ", " Paris. ", " It is large. "], system="Be brief.")


def _add_chatml_tokens(d: Path) -> tuple[int, int]:
    """Give a tokenizer.json ChatML's two special tokens, as a ChatML model's vocabulary has."""
    from tokenizers import AddedToken, Tokenizer

    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    names = ("<|im_start|>", "<|im_end|>")
    tk.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tk.save(str(d / "tokenizer.json"))
    return tk.token_to_id(names[0]), tk.token_to_id(names[1])


def test_chatml_template(tmp_path):
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, CHATML)
    _, im_end = _add_chatml_tokens(d)
    tok, hf = minillm.load_tokenizer(d), _hf_tokenizer(d)
    assert tok.eos_id != im_end  # the reply still stops, at the template's end-of-turn token
    fed = check_conversation(tok, hf, ["Hi!", "Paris.", "It is large."], stop=im_end)
    assert fed.count(im_end) == 2 * len(USERS)  # the system prompt, each user turn, each reply but the last


def test_named_template_list_uses_default(tmp_path):
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, NAMED)
    tok, hf = minillm.load_tokenizer(d), _hf_tokenizer(d)
    assert tok.chat_template == NAMED[1]["template"]
    check_conversation(tok, hf, [" Hi!", " Paris.", " It is large."])


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, "{{ 'from tokenizer_config' }}")
    (d / "chat_template.jinja").write_text(CHATML)
    assert minillm.load_tokenizer(d).chat_template == CHATML
    hf = _hf_tokenizer(d)
    assert hf.chat_template == CHATML  # transformers agrees on the order


def test_end_of_turn_token_stops_a_reply(tmp_path):
    # ChatML's <|im_end|> ends a reply even when the tokenizer's EOS is another token.
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, CHATML)
    _, new_id = _add_chatml_tokens(d)
    tok = minillm.load_tokenizer(d)
    assert tok.eos_id != new_id
    model = Scripted(tok.vocab_size + 1, encode_continuation(tok, "Hi") + [new_id] + [5] * 10)
    chat = ChatSession(model, tok, temperature=0, max_new_tokens=50)
    assert "".join(chat.turn("x")) == "Hi" and new_id in chat.stop_ids


def test_template_errors_are_one_line(tmp_path):
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, LLAMA2)
    tok = minillm.load_tokenizer(d)
    chat = ChatSession(Scripted(tok.vocab_size, [tok.eos_id] * 4), tok, temperature=0)
    chat.messages = [{"role": "assistant", "content": "out of order"}]
    with pytest.raises(minillm.MiniLLMError, match="chat template failed: Conversation roles must alternate"):
        list(chat.turn("hi"))


# --- the Jinja environment is transformers' ------------------------------------------------------

JINJA_CASES = {
    "tojson": "{% for m in messages %}{{ m['content'] | tojson }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}",
    "tojson_indent": "{{ messages | tojson(indent=2) }}{% if add_generation_prompt %}A:{% endif %}",
    "loopcontrols": "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
                    "{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}A:{% endif %}",
    "generation": "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                  "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}A:{% endif %}",
}


@pytest.mark.parametrize("name", sorted(JINJA_CASES))
def test_template_rendering_equals_transformers(tmp_path, name):
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, JINJA_CASES[name])
    tok, hf = minillm.load_tokenizer(d), _hf_tokenizer(d)
    from minillm.apps.chat import render_chat_template

    messages = [{"role": "system", "content": "sys <b> & 'q'"}, {"role": "user", "content": "café \u2014 \"x\""},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_chat_template(tok.chat_template, messages, add_generation_prompt=True, **tok.template_tokens) == want


def test_template_tokens_come_from_tokenizer_config(tmp_path):
    # generation_config lists other EOS ids first (as Llama-3 does): they stop replies, but the
    # template's eos_token is still the tokenizer's own string.
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, LLAMA2)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [5, 1]}))
    tok, hf = minillm.load_tokenizer(d), _hf_tokenizer(d)
    assert tok.eos_id == 5 and tok.template_tokens["eos_token"] == "</s>"
    check_conversation(tok, hf, [" Hi! ", " Paris. ", " It is large. "], system="Be brief.", stop=5)


def test_a_template_that_trims_replies_feeds_only_what_follows_them(tmp_path):
    trim = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim"
            " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, trim)
    _, im_end = _add_chatml_tokens(d)
    tok, hf = minillm.load_tokenizer(d), _hf_tokenizer(d)
    replies = ["Hi! ", "Paris.\n"]  # end in whitespace, which the template trims
    model = Scripted(tok.vocab_size, sum((encode_continuation(tok, r) + [im_end] for r in replies), []) + [im_end])
    chat = ChatSession(model, tok, temperature=0, max_new_tokens=100)
    msgs = []
    for user in USERS[:3]:
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": "".join(chat.turn(user))})
    # The cache holds each reply as generated (untrimmed), and everything else as transformers renders it.
    want = hf.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
    want = want.replace("Hi!<|im_end|>", "Hi! <|im_end|>").replace("Paris.<|im_end|>", "Paris.\n<|im_end|>")
    assert tok.decode(model.fed) == want
    assert model.fed.count(tok.bos_id) == 1  # no second BOS or system block mid-stream


def test_system_prompt_needs_a_template():
    tok = minillm.load_tokenizer(WEIGHTS / "pythia-tiny")
    assert tok.chat_template is None
    with pytest.raises(minillm.MiniLLMError, match="system prompt needs a chat template"):
        ChatSession(Scripted(tok.vocab_size, [1]), tok, system="Be brief.")


@pytest.mark.parametrize("template,needle", [("{{ 1 / 0 }}", "ZeroDivisionError"),
                                             ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
                                             ("{{ messages[0]['content'] + 1 }}", "TypeError")])
def test_a_failing_template_is_one_line(tmp_path, template, needle):
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, template)
    tok = minillm.load_tokenizer(d)
    chat = ChatSession(Scripted(tok.vocab_size, [tok.eos_id]), tok, temperature=0)
    with pytest.raises(minillm.MiniLLMError, match=f"chat template failed: {needle}") as info:
        list(chat.turn("hi"))
    assert "\n" not in str(info.value)


def test_a_reply_read_only_in_part_still_counts(tmp_path):
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, CHATML)
    _, im_end = _add_chatml_tokens(d)
    tok, hf = minillm.load_tokenizer(d), _hf_tokenizer(d)
    model = Scripted(tok.vocab_size, encode_continuation(tok, "one two three four") + [im_end] + [im_end])
    chat = ChatSession(model, tok, temperature=0, max_new_tokens=100)
    gen = chat.turn("Hello there!")
    first = next(gen)
    gen.close()  # the caller stops reading after the first piece
    fed = len(model.fed)
    assert chat.messages[1]["content"] == first and chat.turns == 1
    list(chat.turn("Next"))
    msgs = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "Next"}]
    assert chat.turns == 2
    want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # Continued, not restarted: the fed stream is the conversation so far, then turn 2's own reply.
    assert tok.decode(model.fed).startswith(want) and len(model.fed) > fed
    assert model.fed.count(tok.token_to_id("<|im_start|>")) == 5  # system, user, assistant, user, assistant


def test_a_named_template_list_without_default_is_refused(tmp_path):
    d = _with_template(WEIGHTS / "pythia-tiny", tmp_path, [{"name": "tool_use", "template": "x"}])
    with pytest.raises(minillm.MiniLLMError, match="none named 'default'"):
        minillm.load_tokenizer(d)
