"""``python -m actlightning``: Ctrl-C while the libraries import is one line, not a traceback."""

import sys


def run() -> None:
    try:
        from actlightning.cli import main
    except KeyboardInterrupt:
        print("actlightning: interrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
