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
        run_pipeline(config, workdir)
    except (UserError, CheckpointError, FloatingPointError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()
