"""What new users type (issue 21): the spellings of mlx-lm and llama.cpp, options in the order
they come to mind, stdin, the shipped defaults, chat templates in batch, and the status line.

Each command runs in-process (minillm.cli.main) on the tiny test checkpoint, and is compared with
the old spelling's output; the terminal behaviour runs in a subprocess on a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minillm import cli
from minillm.cli import status as status_mod
from minillm.cli.parser import hoist_global_options
from tiny_ckpt import tiny_checkpoint, training_text  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def main(argv, capsys, monkeypatch=None, stdin: bytes | None = None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("usage") / "book.txt"
    path.write_text(training_text(6_000, seed=4), encoding="utf-8")
    return path


def table(out: str) -> str:
    """ppl's table without its tokens/s column (a timing)."""
    return "\n".join(line.rsplit(None, 1)[0] for line in out.splitlines())


GEN = ["--temperature", 0, "--cache-size", 40, "--threads", 1]


def test_max_tokens_n_p_and_m_are_generate_spellings(tiny_checkpoint, capsys):
    rc, want, _ = main(["generate", tiny_checkpoint, "--prompt", "The whale", "--max-new-tokens", 12, *GEN], capsys)
    assert rc == 0 and want.strip()
    for argv in (["generate", tiny_checkpoint, "--prompt", "The whale", "--max-tokens", 12, *GEN],
                 ["generate", tiny_checkpoint, "-p", "The whale", "-n", 12, *GEN],
                 ["generate", "-m", tiny_checkpoint, "-p", "The whale", "-n", 12, *GEN],
                 ["generate", "--model", tiny_checkpoint, "-p", "The whale", "-n", 12, *GEN],
                 ["generate", tiny_checkpoint, "-m", tiny_checkpoint, "-p", "The whale", "-n", 12, *GEN]):
        rc, out, err = main(argv, capsys)
        assert (rc, out) == (0, want), (argv, err)
    rc, out, err = main(["generate", tiny_checkpoint, "-p", "The whale", "-n", 3, *GEN], capsys)
    assert rc == 0 and err.startswith("minillm: 3 tokens at "), err


def test_two_different_models_are_refused(tiny_checkpoint, tmp_path, capsys):
    rc, _, err = main(["generate", tiny_checkpoint, "-m", tmp_path, "-p", "x"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("minillm: error: two models given"), err


@pytest.mark.parametrize("command", ["chat", "batch"])
def test_max_tokens_on_chat_and_batch(tiny_checkpoint, tmp_path, capsys, command):
    if command == "chat":
        (tmp_path / "t.jsonl").write_text('{"turn": "Hello"}\n')
        base = ["chat", tiny_checkpoint, "--prompts", tmp_path / "t.jsonl", *GEN]
    else:
        (tmp_path / "p.jsonl").write_text('{"prompt": "Hello"}\n{"prompt": "The sea"}\n')
        base = ["batch", tiny_checkpoint, "--input", tmp_path / "p.jsonl", *GEN]
    rc, want, _ = main([*base, "--max-new-tokens", 7], capsys)
    assert rc == 0
    for flag in ("--max-tokens", "-n"):
        rc, out, err = main([*base, flag, 7], capsys)
        assert (rc, out) == (0, want), err
    if command == "batch":
        assert [json.loads(line)["tokens"] for line in want.splitlines()] == [7, 7]


def test_ppl_keeps_max_tokens_as_the_scored_length(tiny_checkpoint, text_file, capsys):
    rc, out, err = main(["ppl", tiny_checkpoint, "--text", text_file, "--max-tokens", 300, "--cache-size", 40,
                         "--threads", 1], capsys)
    assert rc == 0 and "minillm: 300 tokens from 1 file(s)" in err and re.search(r"streaming\s+299\s", out), (out, err)


def test_ppl_model_after_text_files(tiny_checkpoint, text_file, tmp_path, capsys):
    second = tmp_path / "two.txt"
    second.write_text(training_text(2_000, seed=5), encoding="utf-8")
    common = ["--max-tokens", 400, "--cache-size", 40, "--threads", 1]
    rc, want, _ = main(["ppl", tiny_checkpoint, "--text", text_file, second, *common], capsys)
    assert rc == 0
    for argv in (["ppl", "--text", text_file, second, tiny_checkpoint, *common],  # MODEL after the files
                 ["ppl", "--text", text_file, second, "-m", tiny_checkpoint, *common]):
        rc, out, err = main(argv, capsys)
        assert (rc, table(out)) == (0, table(want)), err
        assert "from 2 file(s)" in err, err
    rc, out, err = main(["ppl", "--text", text_file, tiny_checkpoint, *common], capsys)
    assert rc == 0 and "from 1 file(s)" in err, err


def test_ppl_text_from_stdin(tiny_checkpoint, text_file, capsys, monkeypatch):
    common = ["--max-tokens", 300, "--cache-size", 40, "--threads", 1]
    rc, want, _ = main(["ppl", tiny_checkpoint, "--text", text_file, *common], capsys)
    assert rc == 0
    rc, out, err = main(["ppl", tiny_checkpoint, "--text", "-", *common], capsys, monkeypatch,
                        stdin=text_file.read_bytes())
    assert (rc, table(out)) == (0, table(want)), err
    rc, _, err = main(["ppl", tiny_checkpoint, "--text", "-", "-", *common], capsys, monkeypatch, stdin=b"abc")
    assert rc == 2 and err.count("\n") == 1 and "stdin ('-') can be given only once" in err, err
    rc, _, err = main(["ppl", tiny_checkpoint, "--text", "-", *common], capsys, monkeypatch, stdin=b"caf\xe9")
    assert rc == 2 and err.count("\n") == 1 and "stdin is not UTF-8 text" in err, err


@pytest.mark.parametrize("before", [["--threads", "1"], ["--threads=1"], ["--threads", "1", "--dtype", "float32"],
                                    ["--no-fast"], ["-m", "{ckpt}"]])
def test_common_options_before_the_subcommand(tiny_checkpoint, capsys, before):
    before = [str(tiny_checkpoint) if a == "{ckpt}" else a for a in before]
    model = [] if "-m" in before else [tiny_checkpoint]
    rc, want, _ = main(["generate", *model, "-p", "The whale", "-n", 5, "--temperature", 0, *before], capsys)
    assert rc == 0
    rc, out, err = main([*before, "generate", *model, "-p", "The whale", "-n", 5, "--temperature", 0], capsys)
    assert (rc, out) == (0, want), err


def test_hoisting_leaves_everything_else_to_argparse():
    assert hoist_global_options(["--threads", "2", "ppl", "--text", "a"]) == ["ppl", "--threads", "2", "--text", "a"]
    assert hoist_global_options(["--version"]) == ["--version"]
    assert hoist_global_options(["--bogus", "generate"]) == ["--bogus", "generate"]
    # a value that is a command name stays the option's value
    assert hoist_global_options(["-m", "ppl", "generate", "-p", "x"]) == ["generate", "-m", "ppl", "-p", "x"]


def test_a_bad_option_before_the_subcommand_is_one_line(capsys):
    rc, _, err = main(["--threads", "0", "generate", "-p", "x"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "argument --threads: must be >= 1" in err, err
    rc, _, err = main(["--bogus", "generate"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("minillm: error:"), err


# ------------------------------------------------------------------------------------------------
# The shipped defaults: the model and the sample text


def test_ppl_and_attn_read_the_shipped_sample_without_text(tmp_path, capsys):
    from minillm.data import SAMPLE_TEXT

    assert 10_000 < SAMPLE_TEXT.stat().st_size < 200_000
    rc, want, _ = main(["ppl", "--text", SAMPLE_TEXT, "--max-tokens", 300, "--cache-size", 64, "--threads", 1], capsys)
    assert rc == 0
    rc, out, err = main(["ppl", "--max-tokens", 300, "--cache-size", 64, "--threads", 1], capsys)
    assert (rc, table(out)) == (0, table(want)) and "from the shipped sample" in err, err
    pytest.importorskip("matplotlib")
    rc, out, err = main(["attn", "--png", tmp_path / "a.png", "--tokens", 32, "--threads", 1], capsys)
    assert rc == 0 and "minillm: 32 tokens from the shipped sample" in err and (tmp_path / "a.png").stat().st_size
    assert out.startswith("attention on token 0 from queries 16..31")


# ------------------------------------------------------------------------------------------------
# batch and chat templates


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("chatml") / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["chat_template"] = CHATML
    cfg_path.write_text(json.dumps(cfg))
    return d


def test_batch_applies_the_chat_template_as_chat_does(chat_checkpoint, tmp_path, capsys):
    prompts = ["Hello there", "Tell me about the sea"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    common = ["--temperature", 0, "-n", 10, "--cache-size", 64, "--threads", 1, "--ignore-eos"]
    rc, out, err = main(["batch", chat_checkpoint, "--input", tmp_path / "p.jsonl", *common], capsys)
    assert rc == 0, err
    templated = [json.loads(line)["text"] for line in out.splitlines()]
    for prompt, text in zip(prompts, templated):  # the reply `minillm chat` gives to the same first turn
        (tmp_path / "t.jsonl").write_text(json.dumps({"turn": prompt}) + "\n")
        rc, chat_out, err = main(["chat", chat_checkpoint, "--prompts", tmp_path / "t.jsonl", *common], capsys)
        assert rc == 0, err
        assert chat_out == f"USER: {prompt}\nASSISTANT:{text}\n"
    for flag in ("--raw", "--no-chat-template"):  # the opt-out: the raw text, as `minillm generate` reads it
        rc, out, err = main(["batch", chat_checkpoint, "--input", tmp_path / "p.jsonl", flag, *common], capsys)
        assert rc == 0, err
        raw = [json.loads(line)["text"] for line in out.splitlines()]
        rc, gen, _ = main(["generate", chat_checkpoint, "-p", prompts[0], *common], capsys)
        assert raw[0] + "\n" == gen and raw != templated


# ------------------------------------------------------------------------------------------------
# The status line


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def render(raw: str) -> list[str]:
    """What a terminal shows after `raw`: \\r returns to column 0, ESC[K erases to the line's end."""
    lines, col = [""], 0
    for token in re.split(r"(\r|\n|\x1b\[K)", raw):
        if token == "\r":
            col = 0
        elif token == "\n":
            lines.append("")
            col = 0
        elif token == "\x1b[K":
            lines[-1] = lines[-1][:col]
        elif token:
            lines[-1] = lines[-1][:col] + token + lines[-1][col + len(token):]
            col += len(token)
    return lines[:-1] if lines[-1] == "" else lines


def test_status_line_draws_only_on_a_terminal_and_erases_itself():
    term, pipe = FakeTerminal(), io.StringIO()
    for stream in (term, pipe):
        s = status_mod.Status(stream)
        s.show("minillm: loading x ...", every=0)
        s.show("minillm: loading x: tensor 3/9", every=0)
        s.clear()
        stream.write("minillm: error: boom\n")
    assert pipe.getvalue() == "minillm: error: boom\n"
    assert "\r\x1b[Kminillm: loading x: tensor 3/9" in term.getvalue()
    assert render(term.getvalue()) == ["minillm: error: boom"]


def test_load_and_prefill_report_their_progress(tiny_checkpoint):
    import minillm
    from minillm.apps.generation import generate
    from minillm.progress import reporting

    seen = []
    with reporting(lambda phase, done, total: seen.append((phase, done, total))):
        model = minillm.load(tiny_checkpoint)
        tensors = [c for c in seen if c[0] == "tensors"]
        assert tensors[0][1] == 0 and tensors[-1][1] == tensors[-1][2] == len(model.state_dict())
        model.max_chunk = 16
        list(generate(model, list(range(3, 53)), max_new_tokens=1, temperature=0))
    assert [c for c in seen if c[0] == "prefill"] == [("prefill", n, 50) for n in (16, 32, 48, 50)]


def _on_a_pty(argv):
    """Run minillm with stderr on a pseudo-terminal (stdout a pipe); (exit code, stdout, raw stderr)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "minillm", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read().decode()
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_on_a_terminal_progress_redraws_one_line_and_a_refusal_stays_one_line(tiny_checkpoint):
    rc, out, raw = _on_a_pty(["generate", tiny_checkpoint, "-p", "The whale", "-n", 5, "--threads", 1])
    assert rc == 0 and out.strip(), raw
    assert "\r\x1b[Kminillm: starting (importing torch) ..." in raw
    assert f"\r\x1b[Kminillm: loading {tiny_checkpoint.name} ..." in raw
    assert re.search(r"\r\x1b\[Kminillm: loading \S+: tensor \d+/\d+", raw), raw
    shown = render(raw)
    assert len(shown) == 1 and shown[0].startswith("minillm: 5 tokens at "), shown
    # A refusal after the load (the cache-size check): the screen shows its one line only.
    rc, out, raw = _on_a_pty(["generate", tiny_checkpoint, "-p", "x", "--cache-size", 4, "--threads", 1])
    assert rc == 2 and "minillm: loading" in raw
    assert render(raw) == ["minillm: error: --cache-size must exceed --sinks (got --cache-size 4, --sinks 4): "
                           "the window needs at least one slot"], raw
    # A model that fails to load.
    rc, out, raw = _on_a_pty(["generate", "/nonexistent/model", "-p", "x"])
    assert rc == 2 and render(raw) == ["minillm: error: model directory not found: /nonexistent/model"], raw


def test_compile_says_when_it_compiles(capsys):
    import argparse

    from minillm.cli.commands import _compile_note

    _compile_note(argparse.Namespace(compile=False))
    assert capsys.readouterr().err == ""
    _compile_note(argparse.Namespace(compile=True))
    assert capsys.readouterr().err.startswith("minillm: --compile: torch.compile compiles the decode step")
