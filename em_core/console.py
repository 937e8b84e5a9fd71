"""How every `em` command and entry point runs: logging with secrets scrubbed, and user errors
turned into one clear line and exit code 2. Base layer: imports only errors and tracking.
SIGTERM unwinds like Ctrl-C: open runs end KILLED, exit code 143."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from em_core.errors import EmLabError, Terminated, raise_on_sigterm
from em_core.tracking import scrub


class _ScrubSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(scrub(a) if isinstance(a, str) else a for a in record.args)
        return True


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one INFO line per HTTP request (judge, dataset generation) would drown the progress bars
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for h in logging.getLogger().handlers:
        h.addFilter(_ScrubSecrets())


def run_main(fn: Callable[[list[str]], int | None], argv: list[str] | None) -> int:
    """Run an entry point: user errors print one clear line and exit 2, no traceback."""
    setup_logging()
    raise_on_sigterm()
    try:
        return int(fn(list(sys.argv[1:] if argv is None else argv)) or 0)
    except EmLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:  # open runs already ended KILLED on the way out
        print(f"terminated: {e}", file=sys.stderr)
        return 143
