"""``patchbench`` and ``python -m patchbench``: Ctrl-C handling first, then the command line.

Importing the command line (torch, pandas, ...) takes seconds; a Ctrl-C meanwhile must exit
with code 130 and one line, like one during a command, not with a traceback from inside an
import. So a start-up SIGINT handler is installed before that import; ``PatchbenchGroup.invoke``
hands Ctrl-C back to KeyboardInterrupt once it handles it (and keeps finished results).
"""

import os
import signal
import sys

STARTUP_INTERRUPTED = b"Interrupted while starting: nothing was run.\n"


def _interrupted_while_starting(signum, frame) -> None:
    """Nothing has run yet: say so and exit at once (no exception through half an import)."""
    try:
        os.write(2, STARTUP_INTERRUPTED)
    finally:
        os._exit(130)


_interrupted_while_starting.patchbench_startup = True  # recognised by patchbench.cli


def main() -> None:
    """The console entry point (``[project.scripts]``)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup)
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        from patchbench.cli import main as cli_main
    except KeyboardInterrupt:  # a SIGINT handler of someone else's raised it
        sys.stderr.write(STARTUP_INTERRUPTED.decode())
        raise SystemExit(130) from None
    cli_main()


if __name__ == "__main__":
    main()
