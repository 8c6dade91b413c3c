"""The console entry point (`minillm`, `python -m minillm`): signals and streams first, torch later.

Importing torch takes about a second, and a Ctrl-C inside it either escapes as a traceback or is
swallowed by an import that catches everything (the run then goes on, endlessly with
`--max-new-tokens 0`). So this module imports only the standard library, installs a SIGINT
handler that records the interrupt as well as raising it, makes closed standard streams harmless,
and only then imports `minillm.cli`. An interrupt seen at any point exits with code 130 and no
traceback; a broken pipe (`minillm generate ... | head`) stops quietly; a full or failing stdout
(`> /dev/full`) is one line on stderr and exit code 2.

(`import minillm` is light, PEP 562 in `minillm/__init__.py`, so the handler is in place before
torch even under `python -m minillm`.)
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130
_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a SIGINT arrived since the handler was installed (even if something swallowed it)."""
    return _interrupted


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that the flush at exit cannot fail a second time."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def _fill_closed_streams() -> None:
    """A closed stdin/stdout/stderr (`<&-`, `>&-`) is None in Python: read as empty, write nowhere."""
    if sys.stdin is None:
        sys.stdin = open(os.devnull, encoding="utf-8")
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    global _interrupted
    _interrupted = False
    signal.signal(signal.SIGINT, _on_sigint)  # also where a parent shell left SIGINT ignored
    _fill_closed_streams()
    try:
        import torch  # noqa: F401  (the slow import, here, where an interrupt it swallows is seen)

        from minillm.cli import main as cli_main

        if _interrupted:  # an interrupt that some import swallowed
            raise KeyboardInterrupt
        code = cli_main(argv)
        if _interrupted and code == 0:
            code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        try:
            print("", file=sys.stderr)
        except (OSError, ValueError):
            pass
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `| head` closed the pipe: stop quietly, as head expects
        _silence_stdout()
        return 0
    try:
        sys.stdout.flush()  # surface a full or closed pipe here, not in the interpreter's exit
    except BrokenPipeError:
        _silence_stdout()
    except OSError as e:  # stdout on a full disk (/dev/full) or a failing device
        _silence_stdout()
        try:
            print(f"minillm: error: cannot write to stdout: {e.strerror or e}", file=sys.stderr)
        except (OSError, ValueError):
            pass
        return 2
    return code

def run() -> None:
    """`python -m minillm` and the console script."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
