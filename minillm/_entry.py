"""The console entry point (`minillm`, `python -m minillm`): signals and streams first, torch later.

Importing torch takes about a second, and a Ctrl-C inside it either escapes as a traceback or is
swallowed by an import that catches everything (the run then goes on, endlessly with
`--max-new-tokens 0`), or aborts the process from C++. So the package's very first statement,
when it runs as the command line, installs a SIGINT handler that records the interrupt (and raises
it once the imports are done); this module imports only the standard library, makes closed
standard streams harmless, and only then imports torch and `minillm.cli`. An interrupt seen at any
point exits with code 130 and no traceback; a broken pipe (`minillm generate ... | head`) stops
quietly; a full or failing stdout (`> /dev/full`) is one line on stderr and exit code 2.

SIGTERM (`timeout`, systemd, container runtimes, `kill`) is handled exactly as SIGINT: every
command writes what it has finished (batch its finished records, ppl its scores so far), and the
process exits with 143 (128 + SIGTERM) instead of 130.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
_interrupted = False
_terminated = False  # the interrupt was a SIGTERM


_raising = False  # until `main` is inside its try block, an interrupt is only recorded
_early = False  # installed by the package's first statement: keep what it recorded


def _on_sigint(signum, frame):
    global _interrupted, _terminated
    first = not _interrupted
    _interrupted = True
    _terminated = _terminated or signum == signal.SIGTERM
    # Raised once: a second signal (Ctrl-C twice, `timeout` then systemd) lands while the first is
    # being handled, writing what is finished; raised there, it would lose that output.
    if _raising and first:
        raise KeyboardInterrupt


from ._probe import reached as _reached  # noqa: E402  (standard library only)


def install_signal_handling(*, at_start_up: bool = True) -> None:
    """Record SIGINT and SIGTERM (also where a parent shell left them ignored), and raise them as
    KeyboardInterrupt once `main` runs; the package's first statement calls this when it runs as
    the command line."""
    global _early
    _early = at_start_up
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigint)
    _reached("handler")


def interrupted() -> bool:
    """Whether a SIGINT or SIGTERM arrived since the handler was installed (even if something
    swallowed it)."""
    return _interrupted


def _exit_code(code: int) -> int:
    """An interrupted run's code: 143 when the interrupt was a SIGTERM, else as given."""
    return EXIT_TERMINATED if _terminated and code == EXIT_INTERRUPTED else code


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


def _status(text: str) -> None:
    """Redraw the status line on stderr with `text` (empty: erase it), only on a terminal."""
    try:
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    global _interrupted, _raising, _early, _terminated
    if not _early:  # not installed by the package's first statement (or a second run in one process)
        _interrupted = _terminated = False
        install_signal_handling(at_start_up=False)
    _early = False
    _fill_closed_streams()
    try:
        # The imports only record an interrupt: raised inside torch's import, it can abort the
        # process from C++ ("terminate called after throwing ... KeyboardInterrupt") or surface as
        # another error (numpy's "cannot load module more than once per process"). It is acted on
        # as soon as they are done, about a second later at most.
        try:
            # On a terminal, a status line while torch imports (seconds, tens on a cold disk),
            # erased once it is done; elsewhere nothing (minillm/cli/status.py).
            _status("minillm: starting (importing torch) ...")
            import torch  # noqa: F401  (the slow import)

            _status("")

            _reached("torch")
            from minillm.cli import main as cli_main
        except Exception:
            if _interrupted:
                raise KeyboardInterrupt from None
            raise
        _reached("cli")
        _raising = True
        if _interrupted:  # it came during start-up
            raise KeyboardInterrupt
        code = cli_main(argv)
        if _interrupted and code == 0:
            code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        try:
            print("", file=sys.stderr)
        except (OSError, ValueError):
            pass
        return _exit_code(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `| head` closed the pipe: stop quietly, as head expects
        _silence_stdout()
        return 0
    _raising = False  # past the try: a late interrupt is only recorded (raised here, it would escape)
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
    return _exit_code(code)

def run() -> None:
    """`python -m minillm` and the console script."""
    try:
        code = main()
    except KeyboardInterrupt:  # one that landed outside main's own handling: the same exit, no traceback
        code = _exit_code(EXIT_INTERRUPTED)
    if _interrupted:  # the interpreter's shutdown restores the default handlers: a late signal
        for sig in (signal.SIGINT, signal.SIGTERM):  # would kill the process (-15) after its output
            signal.signal(sig, signal.SIG_IGN)
    _reached("exit")
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
