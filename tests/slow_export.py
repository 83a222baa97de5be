"""``python -m tests.slow_export ARGS``: the real CLI with each forward pass slowed down, so that a
test can interrupt an export while it runs."""

import sys
import time

from actlightning.__main__ import run
from actlightning.model.capture import HiddenStateCapture

_forward = HiddenStateCapture.__call__


def _slow_forward(self, **inputs):
    time.sleep(0.05)
    return _forward(self, **inputs)


if __name__ == "__main__":
    HiddenStateCapture.__call__ = _slow_forward
    sys.argv[0] = "actlightning"
    run()
