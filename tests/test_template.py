"""A chat template runs within a budget (issue 20, category 2): a time limit and a size limit, in
any thread, wherever the template came from (chat_template.jinja, tokenizer_config.json, a GGUF:
tests/test_gguf.py). Normal templates render exactly as jinja2's sandbox renders them.

The limits are lowered here (time_limit=1 s) so a refusal comes quickly; the assertions never
depend on how fast the machine is (the generous hang guard aside)."""

import json
import re
import shutil
import sys
import threading
from pathlib import Path

import pytest

import minillm
from minillm.apps.chat import ChatSession, render_chat_template
from minillm.apps.template import DEFAULT_MAX_CHARS, DEFAULT_SECONDS
from minillm.errors import MiniLLMError

sys.path.insert(0, str(Path(__file__).parent))
from test_chat import CHATML, LLAMA2  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
MSGS = [{"role": "user", "content": "hi"}]

# Templates that run forever (and output nothing), or that make too much.
SLOW = {
    "nested empty range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a long string": "{% set s = 'y' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}"
                                       "{% endfor %}",
    "exponential macro recursion": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "a loop with loop.index": "{% for i in range(100000) %}{% for j in range(100000) %}{% if loop.last %}x"
                              "{% endif %}{% endfor %}{% endfor %}",
    "exponential recursive loop": "{% for n in [60] recursive %}{% if n %}{{ loop([n - 1, n - 1]) }}{% endif %}"
                                  "{% endfor %}",
}
BIG = {
    "'y' * 100000, 100000 times": "{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}",
    "a huge repetition": "{{ 'y' * 100000000 }}",
    "a list repeated, joined": "{{ (['y' * 100000] * 100000)|join }}",
    "a list repeated, printed": "{{ ['y' * 1000000] * 1000 }}",
    "doubling with ~": "{% set ns = namespace(x='y') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}"
                       "{% endfor %}{{ ns.x|length }}",
    "doubling with +": "{% set ns = namespace(x='y') %}{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}"
                       "{% endfor %}",
    "doubling through macro arguments": "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n-1) }}{% endif %}{% endmacro %}"
                                        "{{ d('y', 60) }}",
    "squaring an integer": "{% set ns = namespace(x=10) %}{% for i in range(60) %}{% set ns.x = ns.x * ns.x %}"
                           "{% endfor %}",
    "a power": "{% set n = 10 ** 9 %}{{ 10 ** n }}",
    "center": "{{ 'y'|center(1000000000) }}",
    "indent": "{{ 'y\ny'|indent(1000000000) }}",
    "format filter": "{{ '%999999999d'|format(1) }}",
    "% operator": "{% set f = '%999999999d' %}{{ f % 1 }}",
    "str.format": "{{ '{:>999999999}'.format(1) }}",
    "str.replace": "{{ ('y' * 100000).replace('y', 'y' * 100000) }}",
    "replace filter": "{{ ('y' * 100000)|replace('y', 'y' * 100000) }}",
    "lipsum": "{{ lipsum(1000000) }}",
    "a {% set %} block": "{% set x %}{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}{% endset %}",
    "a macro's body": "{% macro m() %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endmacro %}{{ m() }}",
    "join with a long separator": "{{ (['a'] * 100000)|join('y' * 100000) }}",
    "sum of repeated lists": "{{ ([['y' * 100000]] * 100000)|sum(start=[])|length }}",
}


def _refused(template: str, match: str, **kw) -> None:
    """The render is refused with one line matching `match`. It runs in a daemon thread joined
    with a generous hang guard (60 s), so a template that is not stopped fails the test, not the run."""
    got = []

    def work():
        try:
            got.append(render_chat_template(template, MSGS, add_generation_prompt=True, **kw))
        except BaseException as e:  # noqa: BLE001 - what it raised is the result
            got.append(e)
    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(60)
    assert got, "the template was not stopped: a hang"
    assert isinstance(got[0], MiniLLMError), repr(got[0])[:300]
    assert re.search(match, str(got[0])) and "\n" not in str(got[0]), str(got[0])


@pytest.mark.parametrize("name", SLOW)
def test_a_template_that_runs_forever_stops_at_its_time_limit(name):
    _refused(SLOW[name], r"ran past its time limit of 1 s \(MINILLM_TEMPLATE_SECONDS raises it\)", time_limit=1)


@pytest.mark.parametrize("name", BIG)
def test_a_template_that_makes_too_much_is_refused_before_it_does(name):
    _refused(BIG[name], r"past the limit of 10,000,000 characters \(MINILLM_TEMPLATE_MAX_CHARS raises it\)"
             r"|past 1048576 bits", time_limit=30)


def test_deep_recursion_is_one_line():
    _refused("{% macro f(n) %}{{ f(n+1) }}{% endmacro %}{{ f(0) }}", "RecursionError", time_limit=30)


def test_the_budget_holds_outside_the_main_thread():
    """A server renders in a worker thread: no signal can stop it there; the budget still does
    (two threads at once, each with its own budget)."""
    errors = []

    def work():
        for t in (SLOW["nested empty range loops"], BIG["a huge repetition"]):
            try:
                render_chat_template(t, MSGS, add_generation_prompt=True, time_limit=1)
            except MiniLLMError as e:
                errors.append(str(e))
    threads = [threading.Thread(target=work, daemon=True) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads)
    assert sum("time limit of 1 s" in e for e in errors) == 2 and sum("100,000,000 characters" in e for e in errors) == 2


def test_the_limits_are_configurable(monkeypatch):
    assert (DEFAULT_SECONDS, DEFAULT_MAX_CHARS) == (5.0, 10_000_000)
    monkeypatch.setenv("MINILLM_TEMPLATE_SECONDS", "0.5")
    _refused(SLOW["nested empty range loops"], "time limit of 0.5 s")
    monkeypatch.setenv("MINILLM_TEMPLATE_MAX_CHARS", "1000")
    _refused("{{ 'y' * 1001 }}", "past the limit of 1,000 characters")
    assert render_chat_template("{{ 'y' * 1000 }}", MSGS, add_generation_prompt=True) == "y" * 1000
    _refused("{% for i in range(11) %}{{ 'y' * 100 }}{% endfor %}", "wrote output of 1,100 characters")
    assert len(render_chat_template("{{ 'y' * 5000 }}", MSGS, add_generation_prompt=True, max_chars=5000)) == 5000
    for bad in ("x", "-1", "0", "nan", "inf"):
        monkeypatch.setenv("MINILLM_TEMPLATE_SECONDS", bad)
        _refused("hi", "MINILLM_TEMPLATE_SECONDS")
    monkeypatch.delenv("MINILLM_TEMPLATE_SECONDS")
    for kw in (dict(time_limit=0), dict(time_limit="5"), dict(max_chars=0), dict(max_chars=1.5)):
        _refused("hi", "limit must be", **kw)


def test_normal_templates_render_as_the_plain_sandbox_does():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    convo = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"  turn {i}: " + "the whale " * i} for i in range(12)]
    extra = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ m['role']|upper }}{{ m['content']|trim|length }}"
             "{% if not loop.last %}, {% endif %}{% endfor %}{{ '%05d' % 42 }}{{ '{:>6}'.format('x') }}"
             "{{ (['a', 'b'] * 3)|join('-') }}{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ 'x'|center(9) }}"
             "{% set ns = namespace(n='') %}{% for i in range(5) %}{% set ns.n = ns.n ~ i %}{% endfor %}{{ ns.n }}"
             "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ n }}{% endif %}{% endmacro %}{{ f(5) }}"
             "{% for x in [[1, [2, 3]], [4]] recursive %}[{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}"
             "{% endif %}]{% endfor %}{% set b %}{{ 'captured' }}{% endset %}{{ b }}")
    for template in (CHATML, LLAMA2, extra):
        for messages in (convo, convo[1:]):
            kw = dict(bos_token="<s>", eos_token="</s>")
            try:
                want = plain.from_string(template).render(messages=messages, add_generation_prompt=True, **kw)
            except Exception:  # Llama-2 refuses a system turn it cannot place: the same refusal
                with pytest.raises(MiniLLMError):
                    render_chat_template(template, messages, add_generation_prompt=True, **kw)
                continue
            assert render_chat_template(template, messages, add_generation_prompt=True, **kw) == want


def _with_template(tmp_path, where: str, template: str) -> Path:
    d = tmp_path / where
    shutil.copytree(WEIGHTS / "pythia-tiny", d)
    if where == "jinja":
        (d / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("where", ["jinja", "tokenizer_config"])
def test_the_budget_holds_wherever_the_template_comes_from(tmp_path, where, monkeypatch, capsys):
    from minillm import cli

    monkeypatch.setenv("MINILLM_TEMPLATE_SECONDS", "1")
    for template, match in ((SLOW["nested empty range loops"], "time limit of 1 s"),
                            (BIG["'y' * 100000, 100000 times"], "characters")):
        d = _with_template(tmp_path / str(len(match)), where, template)
        tok = minillm.load_tokenizer(d)
        session = ChatSession(minillm.load(d), tok, max_new_tokens=2)
        with pytest.raises(MiniLLMError, match=match):
            list(session.turn("hi"))
        (tmp_path / "turns.jsonl").write_text('{"turn": "hi"}\n')
        rc = cli.main(["chat", str(d), "--prompts", str(tmp_path / "turns.jsonl"), "--max-new-tokens", "2",
                       "--threads", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("minillm: error: the checkpoint's chat template") and match in err[-1]
        assert not [line for line in err if "Traceback" in line]
