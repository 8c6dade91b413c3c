"""Rendering a checkpoint's chat template (Jinja) the way transformers does, within a budget.

A chat template is code from a file (a GGUF's `tokenizer.chat_template`, `chat_template.jinja`,
`tokenizer_config.json`). It runs in jinja2's sandbox (no attribute escapes), and within a budget:

- a time limit, `MINILLM_TEMPLATE_SECONDS` (default 5 s). Jinja repeats only through `for` loops
  and calls (macros, recursion, `loop(...)`), so the deadline is checked as every loop takes its
  next item (a loop that outputs nothing, over `range` or a long string, stops too), at every call,
  operator, filter and piece of text. It rests on no signal and no trace hook, so it works in any
  thread (a server renders there) and costs little;
- a size limit, `MINILLM_TEMPLATE_MAX_CHARS` (default 10,000,000 characters), on the output
  (streamed with `Template.generate`) and on every value the template makes: `*`, `**`, `+`, `%`
  and `~` are checked before they compute (`'y' * 100000` a hundred thousand times, a string
  doubled forty times, `10 ** 10 ** 9`), as are the calls and filters that take a width or a
  count (`center`, `indent`, `format`, `replace`, `join`, `lipsum`) and the text a macro or a
  `{% set %}` block collects.

`render_chat_template(..., time_limit=, max_chars=)` overrides both for one call. Past either,
the render is one MiniLLMError naming the limit and how to raise it.
"""

from __future__ import annotations

import math
import operator
import os
import re
import threading
import time

from ..errors import MiniLLMError, first_line

DEFAULT_SECONDS = 5.0
DEFAULT_MAX_CHARS = 10_000_000
MAX_INT_BITS = 1 << 20  # an integer the template computes: ~315,000 decimal digits at most


def template_limits(time_limit: float | None = None, max_chars: int | None = None) -> tuple[float, int]:
    """The budget of one render: the arguments, else MINILLM_TEMPLATE_SECONDS and
    MINILLM_TEMPLATE_MAX_CHARS, else 5 s and 10,000,000 characters."""
    if time_limit is None:
        time_limit = _env_number("MINILLM_TEMPLATE_SECONDS", DEFAULT_SECONDS, float)
    if max_chars is None:
        max_chars = _env_number("MINILLM_TEMPLATE_MAX_CHARS", DEFAULT_MAX_CHARS, int)
    if not isinstance(time_limit, (int, float)) or isinstance(time_limit, bool) or not time_limit > 0:
        raise MiniLLMError(f"the chat template's time limit must be a number of seconds > 0, got {time_limit!r}")
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
        raise MiniLLMError(f"the chat template's size limit must be an integer >= 1, got {max_chars!r}")
    return float(time_limit), max_chars


def _env_number(name: str, default, kind):
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = kind(text)
    except ValueError:
        raise MiniLLMError(f"{name}={text[:40]!r} is not a {'number' if kind is float else 'whole number'}") from None
    if not (value > 0 and math.isfinite(value)):
        raise MiniLLMError(f"{name} must be > 0, got {text[:40]}")
    return value


class _OverBudget(BaseException):
    """Raised inside the render (a BaseException: no `except Exception` in jinja's runtime or a
    filter can swallow it)."""


class _Budget:
    """The limits of the render running in this thread."""

    def __init__(self, seconds: float, max_chars: int):
        self.seconds, self.max_chars = seconds, max_chars
        self.deadline = time.monotonic() + seconds

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"ran past its time limit of {self.seconds:g} s "
                              f"(MINILLM_TEMPLATE_SECONDS raises it)")

    def check_size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            verb = {"output": "wrote", "an argument": "took", "a format width": "used"}.get(what, "made")
            raise _OverBudget(f"{verb} {what} of {n:,}{'' if what in ('an argument', 'a format width') else ' characters'}, "
                              f"past the limit of {self.max_chars:,} characters (MINILLM_TEMPLATE_MAX_CHARS raises it)")


_local = threading.local()


def _budget() -> _Budget | None:
    return getattr(_local, "budget", None)


def _weight(x, depth: int = 0) -> int:
    """About how many characters `x` prints as: a string its length, a list or dict the sum of its
    items (a list of one long string repeated is as long as its text)."""
    if isinstance(x, (str, bytes)):
        return len(x)
    if depth > 8:
        return 1
    if isinstance(x, (list, tuple)):
        return len(x) + sum(_weight(v, depth + 1) for v in x)
    if isinstance(x, dict):
        return len(x) + sum(_weight(k, depth + 1) + _weight(v, depth + 1) for k, v in x.items())
    if isinstance(x, int) and not isinstance(x, bool):
        return x.bit_length() // 3 + 1
    return 1


_WIDTH = re.compile(r"\d{6,}")  # a width or precision of a million or more in a format string


def _check_format(fmt, budget: _Budget) -> None:
    if isinstance(fmt, str):
        for m in _WIDTH.finditer(fmt):
            budget.check_size(int(m.group()) if len(m.group()) < 30 else budget.max_chars + 1,
                              "a format width")


def _check_args(args, kwargs, budget: _Budget) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > budget.max_chars:
            budget.check_size(abs(v) if v.bit_length() < 256 else budget.max_chars + 1, "an argument")


def _check_call(name: str, target, args, kwargs, budget: _Budget) -> None:
    """Before a call: integer arguments (widths, counts) and what replace, join, format and
    lipsum would make."""
    _check_args(args, kwargs, budget)
    if name in ("format", "format_map", "__mod__"):
        _check_format(target, budget)
    elif name == "replace" and isinstance(target, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        n = len(target) + 1 if old == "" else target.count(old)
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        budget.check_size(len(target) + n * max(len(new) - len(old), 0), "a replace")
    elif name == "join" and isinstance(target, str) and args and isinstance(args[0], (list, tuple)):
        budget.check_size(_weight(args[0]) + len(target) * len(args[0]), "a join")
    elif name in ("lipsum", "generate_lorem_ipsum"):
        n = args[0] if args else kwargs.get("n", 5)
        most = args[3] if len(args) > 3 else kwargs.get("max", 100)
        if isinstance(n, int) and isinstance(most, int):
            budget.check_size(n * most * 12, "lipsum")


def _checked_binop(op: str, left, right):
    budget = _budget()
    if budget is not None:
        budget.check_time()
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    budget.check_size(_weight(seq) * max(n, 0), "a repetition")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _OverBudget(f"multiplied integers past {MAX_INT_BITS} bits")
        elif op == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 and \
                    (right > MAX_INT_BITS or abs(left).bit_length() * right > MAX_INT_BITS):
                raise _OverBudget(f"raised an integer past {MAX_INT_BITS} bits")
        elif op == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                budget.check_size(_weight(left) + _weight(right), "a sum")
        elif op == "%":
            _check_format(left, budget)
    result = _BINOPS[op](left, right)
    if budget is not None and op == "%" and isinstance(result, str):
        budget.check_size(len(result), "a formatted string")
    return result


_BINOPS = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}


def _checked_concat(parts) -> str:
    """`~` and the text a macro or a {% set %} block collects: one string, its size checked first."""
    parts = [p if isinstance(p, str) else str(p) for p in parts]
    budget = _budget()
    if budget is not None:
        budget.check_time()
        budget.check_size(sum(map(len, parts)), "a string")
    return "".join(parts)


class _Buffer(list):
    """The list a macro body or a {% set %} block appends its text to, its size checked as it grows."""

    chars = 0

    def append(self, item) -> None:
        self._count((item,))
        super().append(item)

    def extend(self, items) -> None:
        items = tuple(items)
        self._count(items)
        super().extend(items)

    def _count(self, items) -> None:
        budget = _budget()
        if budget is not None:
            self.chars += sum(len(x) if isinstance(x, str) else 1 for x in items)
            budget.check_size(self.chars, "collected text")
            budget.check_time()


def _wrap_filter(name: str, f):
    if getattr(f, "minillm_checked", False):
        return f

    skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # pass_context & co.: the first argument is jinja's

    def checked(*args, **kwargs):
        budget = _budget()
        if budget is not None:
            budget.check_time()
            plain = args[skip:]
            _check_args(plain, kwargs, budget)
            if name == "format" and plain:
                _check_format(plain[0], budget)
            elif name == "replace" and len(plain) >= 3:
                _check_call("replace", str(plain[0]), plain[1:], kwargs, budget)
            elif name == "join" and plain and isinstance(plain[0], (list, tuple)):
                sep = plain[1] if len(plain) > 1 and isinstance(plain[1], str) else kwargs.get("d", "")
                budget.check_size(_weight(plain[0]) + len(sep) * len(plain[0]), "a join")
        result = f(*args, **kwargs)
        if budget is not None and isinstance(result, (str, list, tuple)):
            budget.check_size(_weight(result), f"the filter {name}'s result")
        return result

    if skip:
        checked.jinja_pass_arg = f.jinja_pass_arg
    checked.minillm_checked = True
    return checked


def sandbox_class():
    """ImmutableSandboxedEnvironment with the checks above (built on first use: jinja2 is imported lazily)."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generator(CodeGenerator):
        def buffer(self, frame):  # what a macro or a {% set %} block collects: sized as it grows
            frame.buffer = self.temporary_identifier()
            self.writeline(f"{frame.buffer} = environment.minillm_buffer()")

        def visit_For(self, node, frame):  # every loop checks the deadline as it takes items
            if not node.recursive:
                node.iter = nodes.Call(nodes.EnvironmentAttribute("minillm_iter"), [node.iter], [], None, None)
            super().visit_For(node, frame)

        def visit_Concat(self, node, frame):  # `a ~ b`: sized before it is built
            self.write("environment.minillm_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Sandbox(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset(_BINOPS)
        concat = staticmethod(_checked_concat)  # macro bodies and {% set %} blocks
        minillm_concat = staticmethod(_checked_concat)
        minillm_buffer = _Buffer
        minillm_iter = staticmethod(_checked_iter)

        def call_binop(self, context, op, left, right):
            return _checked_binop(op, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            budget = _budget()
            if budget is not None:  # (the sandbox wraps str.format: the string is its __wrapped__'s)
                budget.check_time()
                target = getattr(__obj, "__self__", None)
                if target is None:
                    target = getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
                _check_call(getattr(__obj, "__name__", ""), target, args, kwargs, budget)
            result = super().call(__context, __obj, *args, **kwargs)
            if budget is not None and isinstance(result, (str, list, tuple)):
                budget.check_size(_weight(result), "a call's result")
            return result

        def check_filters(self) -> None:
            for name, f in list(self.filters.items()):
                self.filters[name] = _wrap_filter(name, f)

    return Sandbox


_COMPILED: dict = {}
_COMPILED_LOCK = threading.Lock()


def _compiled(env, source: str):
    """The compiled template of `source` (a chat renders the same template every turn)."""
    key = (id(env), source)
    template = _COMPILED.get(key)
    if template is None:
        template = env.from_string(source)
        with _COMPILED_LOCK:  # renders may run in several threads at once
            if len(_COMPILED) >= 16:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = template
    return template


def _checked_iter(items):
    """What a `for` loop iterates, the deadline checked every 64 items."""
    budget = _budget()
    for i, x in enumerate(items):
        if not i & 63 and budget is not None:
            budget.check_time()
        yield x


def render_budgeted(env, source: str, variables: dict, time_limit: float | None = None,
                    max_chars: int | None = None) -> str:
    """Compile `source` in `env` and render it within the budget (the module docstring; jinja
    folds constants while it compiles, `'y'|center(10**9)` too, so compiling is budgeted as well);
    raise MiniLLMError past it."""
    seconds, limit = template_limits(time_limit, max_chars)
    budget = _Budget(seconds, limit)
    outer = _budget()
    _local.budget = budget
    try:
        parts, n = [], 0
        for chunk in _compiled(env, source).generate(**variables):
            n += len(chunk)
            budget.check_size(n, "output")
            budget.check_time()
            parts.append(chunk)
        return "".join(parts)
    except _OverBudget as e:
        raise MiniLLMError(f"the checkpoint's chat template {e}") from None
    except RecursionError:
        raise MiniLLMError("the checkpoint's chat template failed: RecursionError: it recurses too deeply") from None
    finally:
        _local.budget = outer


def message(e: BaseException, template_error: type) -> str:
    return (f"the checkpoint's chat template failed: {first_line(e)}" if isinstance(e, template_error)
            else f"the checkpoint's chat template failed: {type(e).__name__}: {first_line(e)}")
