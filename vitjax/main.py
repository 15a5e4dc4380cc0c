"""Command line: `python -m vitjax.main --config=configs/digits.py --workdir=runs/digits`.

Flags and stage dispatch only; the stages live in `vitjax.stages` and the modules they call.
Override any config field with `--config.<field>=<value>`, e.g. `--config.stages=score` or
`--config.train.steps=100`.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

# TensorFlow (the input pipeline) must neither print its banner nor take accelerator memory.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/digits.py.", lock_config=False
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for all results; rerunning the same command resumes there."
)


def _quiet_orbax(record) -> bool:
    """orbax logs every checkpoint write at INFO; keep its warnings, drop the chatter."""
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_orbax)
    from vitjax.errors import UserError
    from vitjax.parallel import maybe_initialize
    from vitjax.stages.runner import run_pipeline
    from vitjax.training import CheckpointError

    config = _CONFIG.value
    # Multi-host: every process runs this same command; initialise before touching devices.
    maybe_initialize(config.get("distributed"))
    workdir = _WORKDIR.value or config.get("workdir")
    if not workdir:
        raise app.UsageError("--workdir is required (or set config.workdir)")
    try:
        if config.get("study") is not None:
            from vitjax.stages.study import run_study

            run_study(config, workdir)
        else:
            run_pipeline(config, workdir)
    except (UserError, CheckpointError, FloatingPointError) as e:
        _fail(_one_line(e))
    except KeyboardInterrupt:
        # Training saved a checkpoint before stopping; search logs are written per evaluation.
        _fail("interrupted (Ctrl-C); finished work is kept: rerun the same command to resume",
              status=130)


def _one_line(error: BaseException | str) -> str:
    """The message of an exception on one line (config loaders raise multi-line ones)."""
    while isinstance(error, Exception) and error.args and isinstance(error.args[0], KeyError):
        error = error.args[0]  # ml_collections: AttributeError(KeyError(...)) for a.b.c=
    if isinstance(error, KeyError) and error.args:  # ml_collections: "'key'\nDid you mean..."
        first, *rest = str(error.args[0]).splitlines() or [""]
        lines = [f"no config field {first.strip(chr(39))!r}", *rest]
    else:
        lines = str(error).splitlines()
    return "; ".join(line.strip() for line in lines if line.strip())


def _fail(message: str, status: int = 2) -> None:
    """One line on stderr and exit `status` (2; 130 for Ctrl-C, as shells report SIGINT);
    skips interpreter teardown, where background threads of orbax/TensorStore would otherwise
    print pages of shutdown noise."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a missing or broken config file and a misspelled or mistyped
    --config.x=y override reported as one line (exit 2) instead of a traceback."""
    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    if not given and "--config" not in argv[1:]:
        _fail("--config is required, e.g. --config=configs/digits.py")
    for value in given:  # 'path' or 'path:argument'
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            _fail(f"--config: no such config file: {path} (the files are in configs/)")
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is None:
            _fail("--config is required, e.g. --config=configs/digits.py")
        return rest
    except flags.Error as e:
        text = str(e).strip()
        if "Traceback (most recent call last)" in text:  # get_config raised: its message only
            text = f"--config: {text.splitlines()[-1]}"
        _fail(_one_line(text))
    except (OSError, KeyError, AttributeError, TypeError, ValueError) as e:
        _fail(f"--config: {_one_line(e)}")


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
