"""`python -m mettle` and the `mettle` script: Ctrl-C at any moment of start-up is one line and exit 130.

The CLI imports torch and pydantic (seconds); a SIGINT meanwhile would otherwise print a KeyboardInterrupt
traceback from deep inside an import. So the handler goes in before any of that, with nothing heavy imported.
"""

import os
import signal
import sys
from types import FrameType

STOPPED_AT_START_UP = "mettle: stopped by SIGINT during start-up, before anything ran; nothing was written"
EXIT_SIGINT = 128 + signal.SIGINT


def main() -> int:
    """Guard the imports against Ctrl-C, then run the command (which takes over SIGINT)."""
    guarded = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # SIG_IGN (a background job) stays
    if guarded:
        signal.signal(signal.SIGINT, stop_during_imports)
    try:
        from mettle.cli import main as run_command

        if guarded:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return run_command()
    except KeyboardInterrupt:  # between the imports and the command's own handling of it
        print(STOPPED_AT_START_UP, file=sys.stderr, flush=True)
        return EXIT_SIGINT


def stop_during_imports(signum: int, frame: FrameType | None) -> None:
    """Exit at once: no process was started and no file written yet, and a half-done import must not unwind."""
    print(STOPPED_AT_START_UP, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_SIGINT)


if __name__ == "__main__":
    sys.exit(main())
