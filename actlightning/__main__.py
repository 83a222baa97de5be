"""``python -m actlightning VERB``: Ctrl-C while the libraries import is one line, not a traceback."""

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
    from actlightning.face.clock import mark_command_line
    from actlightning.face.verbs import resolve

    mark_command_line()

    function, args = resolve(sys.argv[1:])  # imports the verb's libraries
    signal.signal(signal.SIGINT, handler)
    function(args)


if __name__ == "__main__":
    run()
