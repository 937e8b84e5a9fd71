"""How every `em` command and entry point runs: logging with secrets scrubbed, and user errors
turned into one clear line and exit code 2. Base layer: imports only errors and tracking.
SIGTERM unwinds like Ctrl-C: open runs end KILLED, exit code 143."""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable

from em_core.errors import ConfigError, EmLabError, Terminated, raise_on_sigterm
from em_core.tracking import scrub


class _ScrubSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(scrub(a) if isinstance(a, str) else a for a in record.args)
        return True


VERBOSE_ENV = "EM_LAB_VERBOSE"
# Libraries whose INFO lines and warnings a user of the main job need not read (MLflow keeps the
# metrics; `--verbose` shows everything).
_LIBRARIES = ("mlflow", "transformers", "datasets", "peft", "trl", "accelerate", "torch", "urllib3",
              "huggingface_hub", "alembic", "optuna", "matplotlib", "PIL")


def is_verbose() -> bool:
    """`--verbose` was given (children inherit it through the environment)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def setup_logging(level: int = logging.INFO, verbose: bool | None = None) -> None:
    """Quiet by default: our own INFO lines and library warnings go away, warnings and errors
    stay. `verbose` (or EM_LAB_VERBOSE=1) logs everything at `level`, as before."""
    verbose = is_verbose() if verbose is None else verbose
    logging.basicConfig(level=level if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                        else "%(levelname)s: %(message)s")
    # one INFO line per HTTP request (judge, dataset generation) would drown the progress bars
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        for name in _LIBRARIES:
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow resets its logger on import
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Tokenizing ..." bars per step
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
        warnings.simplefilter("ignore")  # deprecation notices of libraries, not the user's problem
    for h in logging.getLogger().handlers:
        h.addFilter(_ScrubSecrets())
    pool = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RetryNotice) for f in pool.filters):
        pool.addFilter(_RetryNotice())
    if not verbose:
        pool.setLevel(logging.WARNING)  # its retry warnings reach _RetryNotice; the rest stays quiet


class _RetryNotice(logging.Filter):
    """MLflow's client retries a tracking server that does not answer for minutes (urllib3,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES with backoff), silently once urllib3 is quiet. The first
    retry per server (again after 5 quiet minutes) becomes one line saying so; the rest, and
    urllib3's other warnings, only show with --verbose."""

    REPEAT_AFTER = 300.0
    _HOST = re.compile(r"host='([^']+)', port=(\d+)")
    _WHY = re.compile(r"(\[Errno -?\d+\] [^'\")]+|timed out|Connection refused|Name or service not known)")

    def __init__(self) -> None:
        super().__init__()
        self.said: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        import time

        if not str(record.msg).startswith("Retrying ("):
            return is_verbose() or record.levelno >= logging.ERROR
        text = record.getMessage()
        m = self._HOST.search(text)
        where = f"{m.group(1)}:{m.group(2)}" if m else "?"
        now = time.monotonic()
        if now - self.said.get(where, -self.REPEAT_AFTER) < self.REPEAT_AFTER:
            return is_verbose()
        self.said[where] = now
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        what = "the MLflow tracking server" if m and uri.startswith("http") and m.group(1) in uri else "the server"
        why = self._WHY.search(text)
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or "7"
        record.msg = (f"{what} at {where} is unreachable ({why.group(1) if why else 'no answer'}); retrying "
                      f"with backoff (up to {retries} times, MLFLOW_HTTP_REQUEST_MAX_RETRIES) before giving up")
        record.args = ()
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/@\s]+)@")


def url_credentials(arg: str) -> bool:
    """`arg` holds a URL with a password (`user:password@`), or a web URL with anything before
    `@` (`https://<token>@host` is how tokens are passed). A bare user name in a database URL
    (`postgresql://emlab@db/optuna`) is not a secret (pure)."""
    return any(":" in info or scheme.lower() in ("http", "https")
               for scheme, info in _URL_USERINFO.findall(str(arg)))


def refuse_url_credentials(argv: list[str]) -> None:
    """Command-line values are recorded as given (`mlflow run` logs every -P as a run parameter,
    `ps` shows them): a URL carrying user:password@ is refused there (config files are fine:
    what the project logs of them is scrubbed)."""
    if any(url_credentials(a) for a in argv):
        hint = ("; `mlflow run` has already recorded it in this run's parameters: delete the run "
                "(mlflow runs delete --run-id $MLFLOW_RUN_ID, then mlflow gc)" if os.environ.get("MLFLOW_RUN_ID") else "")
        raise ConfigError("a command-line URL contains user:password@; give the URL without it and pass the "
                          "credentials by environment variable: for PostgreSQL PGUSER and PGPASSWORD, or a ~/.pgpass "
                          "file (postgresql://db.internal:5432/optuna), or the whole Optuna URL in "
                          "EM_LAB_OPTUNA_STORAGE; OPENAI_API_KEY is sent as the API key" + hint)


def run_main(fn: Callable[[list[str]], int | None], argv: list[str] | None) -> int:
    """Run an entry point: user errors print one clear line and exit 2, no traceback.
    `--verbose` anywhere in argv shows every log line, library warnings and trainer logs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:
        argv = [a for a in argv if a != "--verbose"]
        os.environ[VERBOSE_ENV] = "1"
    setup_logging()
    raise_on_sigterm()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        refuse_url_credentials(argv)
        return int(fn(argv) or 0)
    except EmLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:  # open runs already ended KILLED on the way out
        print(f"terminated: {e}", file=sys.stderr)
        return 143
