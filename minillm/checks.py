"""One argument check for the library's integer arguments (the CLI has its own argparse types).

`check_int("window", window, 1)` returns `window` if it is an int (a bool is not) of at least 1,
and otherwise raises a MiniLLMError that names the argument, the rule and the value given.
"""

from __future__ import annotations

from .errors import MiniLLMError


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, *,
              none_ok: bool = False, hint: str = ""):
    if value is None and none_ok:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value
    rule = "an integer"
    if minimum is not None and maximum is not None:
        rule += f" in [{minimum}, {maximum}]"
    elif minimum is not None:
        rule += f" >= {minimum}"
    elif maximum is not None:
        rule += f" <= {maximum}"
    raise MiniLLMError(f"{name} must be {rule}{' or None' if none_ok else ''}{hint}, got {value!r}")


def check_model(model, what: str = "model") -> None:
    """A model is anything called like minillm's Model with a config and new_cache (duck-typed,
    so wrappers and test doubles pass); a tokenizer, a path or None is refused by name."""
    if not (callable(model) and hasattr(model, "config") and hasattr(model, "new_cache")):
        raise MiniLLMError(f"{what} must be a minillm Model (from minillm.load), got {type(model).__name__}")
