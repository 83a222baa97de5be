"""``python -m actlightning``: Ctrl-C while the libraries import is one line, not a traceback."""

import os
import signal
import sys

STARTING = "actlightning: interrupted while starting; nothing was written\n"


def _interrupted_while_starting(signum: int, frame: object) -> None:
    # Exit at once: a KeyboardInterrupt raised inside a half-imported library (torch, numpy) can
    # surface as another error with a long traceback. Nothing has been written yet.
    sys.stderr.write(STARTING)
    sys.stderr.flush()
    os._exit(130)


def run() -> None:
    handler = signal.getsignal(signal.SIGINT)
    if handler is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    from actlightning.face.cli import main

    signal.signal(signal.SIGINT, handler)
    main()


if __name__ == "__main__":
    run()
