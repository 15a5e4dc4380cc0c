"""Command line: `python -m vitjax.main --config=configs/digits.py --workdir=runs/digits`.

Flags and stage dispatch only; the stages live in `vitjax.pipeline` and the modules it calls.
Override any config field with `--config.<field>=<value>`, e.g. `--config.stages=score` or
`--config.train.steps=100`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/digits.py.", lock_config=False
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for all results; rerunning the same command resumes there."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vitjax.pipeline import PipelineError, run_pipeline

    config = _CONFIG.value
    workdir = _WORKDIR.value or config.get("workdir")
    if not workdir:
        raise app.UsageError("--workdir is required (or set config.workdir)")
    try:
        run_pipeline(config, workdir)
    except PipelineError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()
