"""`python -m minialign` and the `minialign` command (``entry``): ``cli.main``, with Ctrl-C as quiet at any moment
as inside a command: one line on stderr and exit code 130, never a traceback."""

import os
import signal
import sys

INTERRUPTED = "minialign: interrupted"


def _on_interrupt(signum, frame) -> None:
    """SIGINT. Inside an import (torch's and transformers' take seconds), leave at once: a KeyboardInterrupt raised
    in Python code that torch's C++ start-up called cannot unwind through it, and aborts the interpreter
    ("terminate called after throwing ..."); an import has written nothing to clean up. Anywhere else, raise
    KeyboardInterrupt as Python's own handler does, so ``finally`` blocks (temporary files) and the training loop's
    own handler (a last checkpoint) still run, and ``cli.main`` prints the one line."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os.write(2, f"{INTERRUPTED}\n".encode())
            os._exit(130)
        frame = frame.f_back
    raise KeyboardInterrupt


def entry() -> int:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored (nohup)
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        from minialign.cli import main

        code = main()
    except KeyboardInterrupt:  # before main() could catch it
        print(INTERRUPTED, file=sys.stderr)
        return 130
    dist = sys.modules.get("minialign.base.dist")  # loaded by every command that trains; never by --help
    if dist is not None and dist.launched_world() > 1:
        # Under torchrun, a gloo thread left inside torch can abort the interpreter's teardown ("terminate called
        # without an active exception") after the process group is gone. Every file is closed by now: skip it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(entry())
