"""Entry points for `ray job submit -- python -m jobs.<name>` and plain `python -m jobs.<name>`."""

from __future__ import annotations

import sys
from typing import Any

from mmdist.config import Config


def run_job(cfg: Config, stages: tuple[str, ...] | None = None, argv: list[str] | None = None) -> None:
    """Apply ``key=value`` overrides from the command line and run the pipeline."""
    from mmdist.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    raise SystemExit(cli_main(["run", *args], base=cfg, stages=stages))


def run_sweep(cfg: Config, space: dict[str, Any], argv: list[str] | None = None, **kwargs: Any) -> None:
    """Apply ``key=value`` overrides from the command line and run mmdist.sweep.main."""
    import logging

    from mmdist import sweep
    from mmdist.config import absolute_paths, apply_overrides

    logging.basicConfig(level=logging.INFO, format="[mmdist %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = list(sys.argv[1:] if argv is None else argv)
    sweep.main(absolute_paths(apply_overrides(cfg, args)), space, **kwargs)
