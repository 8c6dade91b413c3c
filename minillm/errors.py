"""The one exception type for bad user input.

Every problem a user can cause (a missing file, an unsupported config key, a wrong shape, a bad
argument) is raised as a `MiniLLMError` with a one-line message that names the problem. It is a
`ValueError`, so library callers can catch it as one; the CLI prints it and exits with code 2.
"""


class MiniLLMError(ValueError):
    """Bad input, explained in one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
