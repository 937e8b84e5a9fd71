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


_URL_USERINFO = re.compile(r"://[^/@\s]+@")


def refuse_url_credentials(argv: list[str]) -> None:
    """Command-line values are recorded as given (`mlflow run` logs every -P as a run parameter,
    `ps` shows them): a URL carrying user:password@ is refused there (config files are fine:
    what the project logs of them is scrubbed)."""
    if any(_URL_USERINFO.search(str(a)) for a in argv):
        hint = ("; `mlflow run` has already recorded it in this run's parameters: delete the run "
                "(mlflow runs delete --run-id $MLFLOW_RUN_ID, then mlflow gc)" if os.environ.get("MLFLOW_RUN_ID") else "")
        raise ConfigError("a command-line URL contains user:password@; give the URL without it and pass the "
                          "credentials by environment variable (OPENAI_API_KEY is sent as the API key)" + hint)


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
