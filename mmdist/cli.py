"""The `mmdist` command: parses arguments into a validated Config and calls a stage's main().

    mmdist data && mmdist run                   # the embedded default (Fashion-MNIST)
    mmdist finetune --config my.yaml finetune.minimax.lambda_div=0.01
    mmdist sample --smoke sample.ipc=4
    mmdist plan                                 # each stage: done, current, stale or to do
    mmdist options finetune                     # the fields of a section with their documentation
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys

from mmdist.config import Config, absolute_paths, apply_overrides, describe, load_yaml, to_dict, unknown_field
from mmdist.errors import ConfigError, MmdistError

STAGE_COMMANDS = ("encode", "pretrain", "finetune", "sample", "evaluate", "run")
COMMANDS = {
    "data": "fetch Fashion-MNIST (Debian package or download) or check the configured data",
    **{name: f"run the {name} stage" for name in STAGE_COMMANDS[:-1]},
    "run": "run every stage, skipping finished ones and resuming unfinished ones",
    "plan": "show each stage as done, current, stale or to do, without running anything",
    "config": "print the resolved config",
}


def _version() -> str:
    """The installed package's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmdist")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    """The argument parser (no logic beyond parsing)."""
    p = argparse.ArgumentParser(prog="mmdist", description="Dataset distillation with minimax diffusion on Ray")
    p.add_argument("--version", action="version", version=f"mmdist {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("--config", help="YAML file of overrides to the embedded default")
        s.add_argument("--smoke", action="store_true", help="tiny everything (2 classes, 2 steps)")
        s.add_argument("--output", help="artifact root (local folder or s3://bucket/prefix)")
        s.add_argument("--overwrite", action="store_true", help="redo stages made by a different config")
        what = "stage names to show, and " if name == "plan" else ""
        s.add_argument("overrides", nargs="*", help=f"{what}section.field=value, e.g. sample.ipc=50")
    o = sub.add_parser("options", help="list config fields with their defaults and documentation")
    o.add_argument("section", nargs="?", help="only this section (e.g. finetune, finetune.minimax)")
    return p


def resolve(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Build the config: base (or embedded default) <- YAML <- --smoke <- flags <- overrides."""
    from mmdist import presets

    cfg = base or Config()
    if args.config:
        cfg = load_yaml(args.config, cfg)
    if args.smoke:
        cfg = presets.smoke(cfg)
    if args.output:
        cfg = dataclasses.replace(cfg, output=args.output)
    if args.overwrite:
        cfg = dataclasses.replace(cfg, overwrite=True)
    return absolute_paths(apply_overrides(cfg, [o for o in args.overrides if "=" in o or args.command != "plan"]))


def options(section: str | None) -> list[str]:
    """'name = default' and its documentation for every field (of ``section``)."""
    rows = describe()
    if section:
        prefix = section.rstrip(".") + "."
        rows = [r for r in rows if r[0].startswith(prefix) or r[0] == section]
        if not rows:
            names = sorted({n.rsplit(".", 1)[0] for n, _, _ in describe() if "." in n})
            raise ConfigError(unknown_field(section, names).replace("unknown field", "unknown section"))
    return [f"{name} = {default}\n    {doc}" for name, default, doc in rows]


def error_line(e: BaseException | None) -> str | None:
    """The one line to show for the MmdistError behind an exception raised through Ray, if any.

    A task's or actor's RayTaskError carries the raised exception as ``cause`` (Ray Data's UDFs
    too: ray_runtime sets ``raise_original_map_exception``; Ray Data appends its retry advice on
    further lines); Ray Train's WorkerGroupError keeps each rank's exception in
    ``worker_failures``; the rest is Python's own cause chain.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(getattr(e, "cause", None), BaseException):
            e = e.cause
            continue
        if isinstance(e, MmdistError):
            return (str(e).splitlines() or [type(e).__name__])[0]
        failures = getattr(e, "worker_failures", None) or {}
        e = next(iter(failures.values()), None) or e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None, base: Config | None = None, stages: tuple[str, ...] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    # our INFO lines; other libraries only from WARNING (matplotlib, mlflow, alembic chat at INFO)
    logging.basicConfig(level=logging.WARNING, format="[mmdist %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mmdist").setLevel(logging.INFO)
    try:
        if args.command == "options":
            print("\n".join(options(args.section)))
            return 0
        cfg = resolve(args, base)
        if args.command == "config":
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        if args.command == "plan":
            from mmdist import plan

            plan.main(cfg, [o for o in args.overrides if "=" not in o] or None)
            return 0
        if args.command != "data":  # the data step needs no record of the whole config
            logging.getLogger("mmdist").info("resolved config: %s", json.dumps(to_dict(cfg), sort_keys=True))
        module = importlib.import_module(f"mmdist.{args.command}")
        if args.command == "run":
            module.main(cfg, stages=stages)
        else:
            from mmdist import artifacts

            with artifacts.leases_back_on_failure():
                module.main(cfg)
        return 0
    except KeyboardInterrupt:
        print("mmdist: interrupted; finished shards, checkpoints and classes are kept — rerun to resume",
              file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for what the user can fix; a traceback for our bugs
        if _interrupted(e):
            print("mmdist: interrupted; finished shards, checkpoints and classes are kept — rerun to resume",
                  file=sys.stderr)
            return 130
        line = error_line(e)
        if line is None:
            raise
        print(f"mmdist: error: {line}", file=sys.stderr)
        return 2


def _interrupted(e: BaseException) -> bool:
    """Whether a Ctrl-C started this exception: a library that was starting a thread when the
    KeyboardInterrupt arrived can raise another error while handling it (Ray Data's read_parquet:
    "cannot join thread before it is started"), with the interrupt as its context."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def entry() -> None:
    """Console-script wrapper that exits with main()'s status."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    sys.exit(main())


if __name__ == "__main__":
    entry()
