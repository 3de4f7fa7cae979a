"""The `mmdist` command: parses arguments into a validated Config and calls a stage's main().

    mmdist run                                  # the embedded default (Fashion-MNIST)
    mmdist finetune --config my.yaml finetune.minimax.lambda_div=0.01
    mmdist sample --smoke sample.ipc=4
    mmdist options                              # every config field with its documentation
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import re
import sys

from mmdist.config import Config, absolute_paths, apply_overrides, describe, load_yaml, to_dict
from mmdist.errors import MmdistError

STAGE_COMMANDS = ("encode", "pretrain", "finetune", "sample", "evaluate", "run")


def _parser() -> argparse.ArgumentParser:
    """The argument parser (no logic beyond parsing)."""
    p = argparse.ArgumentParser(prog="mmdist", description="Dataset distillation with minimax diffusion on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    for name in (*STAGE_COMMANDS, "config"):
        s = sub.add_parser(name, help=f"run the {name} stage" if name != "config" else "print the resolved config")
        s.add_argument("--config", help="YAML file of overrides to the embedded default")
        s.add_argument("--smoke", action="store_true", help="tiny everything (2 classes, 2 steps)")
        s.add_argument("--output", help="artifact root (local folder or s3://bucket/prefix)")
        s.add_argument("--overwrite", action="store_true", help="redo stages made by a different config")
        s.add_argument("overrides", nargs="*", help="section.field=value, e.g. sample.ipc=50")
    sub.add_parser("options", help="list every config field with its default and documentation")
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
    return absolute_paths(apply_overrides(cfg, args.overrides))


_REMOTE_ERROR = re.compile(r"mmdist\.errors\.(\w+Error): (.+)")


def _root_cause(e: BaseException) -> MmdistError | None:
    """The MmdistError behind an exception raised through Ray (task, actor or train errors).

    Ray keeps the original exception object for task and actor errors, but Ray Data and Ray
    Train may hand back only its formatted text; then the error line is recovered from it.
    """
    found = _cause_object(e)
    if found is not None:
        return found
    match = _REMOTE_ERROR.search(str(e))
    if match:
        from mmdist import errors

        return getattr(errors, match.group(1), MmdistError)(match.group(2).strip())
    return None


def _cause_object(e: BaseException) -> MmdistError | None:
    """Walk causes, Ray's `.cause` and Ray Train's per-worker failures for an MmdistError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MmdistError):
            return e
        nxt = getattr(e, "cause", None)
        if isinstance(nxt, BaseException):
            e = nxt
            continue
        inner = getattr(e, "worker_failures", None) or getattr(e, "_worker_failures", None)
        if isinstance(inner, dict) and inner:
            e = next(iter(inner.values()))
            continue
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None, base: Config | None = None, stages: tuple[str, ...] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "options":
        for name, default, doc in describe():
            print(f"{name} = {default}\n    {doc}")
        return 0
    logging.basicConfig(level=logging.INFO, format="[mmdist %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mmdist").setLevel(logging.INFO)
    try:
        cfg = resolve(args, base)
        if args.command == "config":
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        logging.getLogger("mmdist").info("resolved config: %s", json.dumps(to_dict(cfg), sort_keys=True))
        module = importlib.import_module(f"mmdist.{args.command}")
        if args.command == "run":
            module.main(cfg, stages=stages)
        else:
            module.main(cfg)
        return 0
    except KeyboardInterrupt:
        print("mmdist: interrupted; finished shards, checkpoints and classes are kept — rerun to resume",
              file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for what the user can fix; a traceback for our bugs
        cause = _root_cause(e)
        if cause is None:
            raise
        print(f"mmdist: error: {cause}", file=sys.stderr)
        return 2


def entry() -> None:
    """Console-script wrapper that exits with main()'s status."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    sys.exit(main())


if __name__ == "__main__":
    entry()
