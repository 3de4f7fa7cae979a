"""Quality benchmark: Fashion-MNIST, ConvNet-3, every ablation row, hard and soft labels, IPC 10 and 50.

    python benchmarks/quality.py [--quick] [--root runs/quality]  ->  benchmarks/results/quality.json
    python benchmarks/quality.py --cpu                             ->  benchmarks/results/quality.cpu.json
    python benchmarks/quality.py --cpu --probe NAME --rows minimax,finetune --set KEY=VALUE ...
                                            ->  benchmarks/results/quality.probe-NAME.json

``--cpu`` is the part that fits about an hour of a 2-core machine: hard labels, IPC 10, the rows
that isolate the method (diffusion, finetune, minimax, minimax+select, random), 5 seeds, 100
epochs (the default run's schedule).

One run, one machine, paired rows (same fine-tuning seed and batches, same sampler noise for image
k of class c, same evaluation seeds):

- ``hard``, IPC 10 (the issue's targets): ``diffusion`` (the shipped DiT, no fine-tuning),
  ``finetune`` (the same fine-tuning with both minimax weights 0), ``representativeness`` and
  ``diversity`` (one term each), ``minimax`` (both: the paper), ``minimax+select`` (4x candidates,
  the 10 per class that cover the real data best; beyond the paper) and ``random`` real images;
  ``SEEDS`` evaluation seeds;
- ``hard``, IPC 50: minimax, diffusion, random (a second sampling run at IPC 50 on the same
  fine-tuned models);
- ``soft``, IPC 10: minimax, minimax+select, diffusion, random, labels from the teacher;
- ``full``: the whole train split, once (the ceiling);
- diagnostics of every generated set: teacher fidelity and precision / recall / density /
  coverage against real train images (``mmdist.diagnostics``).

``--probe`` reruns some rows under changed settings (``--set``: config overrides) in
``<root>/probe-NAME``, sharing the latents and the teacher, and pairs them per seed with the
rows of the ``--cpu`` run in the same root (same evaluation seeds and sampler noise; the
overrides are the only difference). Without a finished ``--cpu`` run in the root the probe makes
its own latents and teacher and pairs its rows with each other only.

Every stage is an mmdist artifact under ``--root``: an interrupted run resumes and finished
trials are not redone. The evaluation trains for ``P["epochs"]``, fewer than the recipes'
1000-2000 on this CPU budget, the same for every row; the JSON records it.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets RAY_AUTH_MODE and sys.path before Ray or mmdist load)

FMNIST = "/usr/share/datasets/fashion-mnist"
ROWS_10 = ("diffusion", "finetune", "representativeness", "diversity", "minimax", "minimax+select", "random")
ROWS_50 = ("diffusion", "minimax", "random")
ROWS_SOFT = ("diffusion", "minimax", "minimax+select", "random")
FULL = dict(seeds=(0, 1, 2, 3, 4), seeds_50=(0, 1, 2), epochs={10: 300, 50: 60, "full": 2}, evals=3,
            teacher_epochs=10, finetune_steps=None, sample_steps=None, max_per_class=None)
CPU = dict(seeds=(0, 1, 2, 3, 4), seeds_50=(0,), epochs={10: 100, 50: 60, "full": 2}, evals=2, teacher_epochs=5,
           finetune_steps=None, sample_steps=None, max_per_class=None,
           rows_10=("diffusion", "finetune", "minimax", "minimax+select", "random"), runs=("hard-ipc10",))
QUICK = dict(seeds=(0,), seeds_50=(0,), epochs={10: 2, 50: 1, "full": 1}, evals=1, teacher_epochs=1,
             finetune_steps=4, sample_steps=4, max_per_class=60)
PAIRS = (("minimax", "diffusion"), ("minimax", "finetune"), ("finetune", "diffusion"),
         ("representativeness", "finetune"), ("diversity", "finetune"), ("minimax+select", "minimax"),
         ("minimax", "random"), ("minimax+select", "random"))
ANCHORS = {  # ConvNet-3 on Fashion-MNIST, hard labels: the DC and DSA papers (docs/method.md §4)
    "random": {10: 73.8, 50: 82.5}, "DC": {10: 82.3, 50: 83.6}, "DSA": {10: 84.6, 50: 88.7}, "whole data": 93.5}


def base_config(root: str, p: dict) -> object:
    """The embedded default with every row at IPC 10; Fashion-MNIST from the Debian package."""
    from mmdist.config import Config, absolute_paths

    cfg = Config()
    quick = dict(steps=p["finetune_steps"]) if p["finetune_steps"] else {}
    return absolute_paths(dataclasses.replace(
        cfg, name="bench-quality", output=os.path.join(root, "ipc10"),
        data=dataclasses.replace(cfg.data, train=FMNIST, download=False, max_per_class=p["max_per_class"]),
        finetune=dataclasses.replace(cfg.finetune, **quick),
        sample=dataclasses.replace(cfg.sample, ipc=10, steps=p["sample_steps"] or cfg.sample.steps),
        evaluate=dataclasses.replace(cfg.evaluate, protocol="hard", methods=p.get("rows_10", ROWS_10),
                                     archs=("convnet",), ipcs=(10,),
                                     seeds=p["seeds"], epochs=p["epochs"][10], evals=p["evals"],
                                     teacher_arch="convnet_w32", teacher_epochs=p["teacher_epochs"]),
    ))


def linked(cfg: object, root: str, name: str, stages: tuple[str, ...], **sections: dict) -> object:
    """A config rooted at <root>/<name> whose ``stages`` folders link to ``cfg``'s (shared, not redone)."""
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    for stage in stages:
        link = os.path.join(out, stage)
        if not os.path.lexists(link):
            os.symlink(os.path.join(cfg.output, stage), link)
    fields = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    return dataclasses.replace(cfg, output=out, **fields)


def paired(trials: list[dict], run: str, pairs: tuple = PAIRS) -> list[dict]:
    """Per-seed differences of best accuracy between rows that share evaluation seeds (and, for the
    generated rows, fine-tuning batches and sampler noise): mean, std and how many seeds favour a."""
    import numpy as np

    acc = {(t["method"], t["arch"], t["ipc"], t["seed"]): t["best_acc"] for t in trials}
    out = []
    for a, b in pairs:
        for arch, ipc in sorted({(k[1], k[2]) for k in acc if k[0] == a}):
            seeds = sorted(k[3] for k in acc if k[:3] == (a, arch, ipc) and (b, arch, ipc, k[3]) in acc)
            if not seeds:
                continue
            diff = np.array([acc[(a, arch, ipc, s)] - acc[(b, arch, ipc, s)] for s in seeds])
            out.append({"run": run, "a": a, "b": b, "arch": arch, "ipc": ipc, "seeds": seeds,
                        "a_minus_b": diff.round(2).tolist(), "mean": round(float(diff.mean()), 2),
                        "std": round(float(diff.std(ddof=1)), 2) if len(diff) > 1 else None,
                        "a_wins": int((diff > 0).sum())})
    return out


def probe(args: object, p: dict, root: str, facts: dict) -> None:
    """``args.rows`` under the ``args.set`` overrides, paired per seed with the base run's trials."""
    import glob
    import json

    from mmdist import run
    from mmdist.config import apply_overrides

    base = base_config(root, p)
    rows = tuple(args.rows.split(","))
    changed = apply_overrides(base, [*args.set, f"evaluate.methods=[{args.rows}]",
                                     f"sample.baseline={str('diffusion' in rows).lower()}"])
    made = [json.load(open(f)) for f in glob.glob(os.path.join(base.output, "eval", "trials", "*.json"))]
    # the base's trials to pair with: a probe under another protocol or IPC pairs its rows with each other
    trials = [t for t in made if t["protocol"] == changed.evaluate.protocol and t["ipc"] in changed.evaluate.ipcs]
    if made:
        cfg = linked(changed, root, f"probe-{args.probe}", ("latents", "teacher"))
    else:  # no base run: the probe encodes and trains its teacher itself; its rows pair with each other
        common.log.warning("no finished base run under %s: the probe's rows pair only with each other", base.output)
        cfg = dataclasses.replace(changed, output=os.path.join(root, f"probe-{args.probe}"))
    common.start_ray(num_cpus=os.cpu_count() or 2)
    with common.Stopwatch() as sw:
        result = run.main(cfg)["evaluate"]
    common.stop_ray()
    # the probe's rows against each other and the base's other rows, then each against its base self
    pairs = [d for d in paired([*[t for t in trials if t["method"] not in rows],
                                *[t for t in result["trials"] if t["method"] in rows]], f"probe-{args.probe}")
             if d["a"] in rows]
    renamed = [{**t, "method": "base " + t["method"]} for t in trials if t["method"] in rows]
    for m in rows:
        pairs += paired([*renamed, *[t for t in result["trials"] if t["method"] == m]], f"probe-{args.probe}",
                        ((m, "base " + m),))
    common.write_json(args.out, common.rnd({
        "probe": args.probe, "overrides": list(args.set), "rows": result["rows"],
        "diagnostics": result.get("diagnostics", []), "paired_with_base": pairs,
        "base": base.output if made else None,
        "wall_seconds": round(sw.seconds, 1), "machine": common.finish_facts(facts)}))
    print(result["table_markdown"])
    for d in pairs:
        print(f"  {d['a']} (probe) - {d['b']}: {d['mean']:+.2f} ± {d['std']} "
              f"({d['a_wins']}/{len(d['seeds'])} seeds) {d['a_minus_b']}")


def main() -> None:
    """Fine-tune every variant, sample at IPC 10 and 50, evaluate the grids, write JSON."""
    def options(parser):
        parser.add_argument("--cpu", action="store_true", help="the hour-long part (see above)")
        parser.add_argument("--probe", default=None, help="name of a probe: some rows under --set overrides")
        parser.add_argument("--rows", default="minimax,finetune", help="the probe's rows (methods), comma-separated")
        parser.add_argument("--set", nargs="*", default=[], help="the probe's config overrides, KEY=VALUE")

    args = common.parse_args(__doc__, "quality", root=True, extra=options)
    if args.probe and args.out.endswith(("quality.json", "quality.quick.json")):
        args.out = args.out.replace("quality.", f"quality.probe-{args.probe}.")
    elif args.cpu and not args.quick and args.out.endswith("quality.json"):
        args.out = args.out.replace("quality.json", "quality.cpu.json")
    p = QUICK if args.quick else CPU if args.cpu else FULL
    root = os.path.abspath(args.root or ("runs/quality-quick" if args.quick else "runs/quality"))
    facts = common.machine_facts()
    common.set_torch_threads(1)
    if args.probe:
        return probe(args, p, root, facts)
    from mmdist import run

    common.start_ray(num_cpus=os.cpu_count() or 2)
    cfg = base_config(root, p)
    runs = {
        "hard-ipc10": cfg,
        "hard-ipc50": linked(cfg, root, "ipc50", ("latents", "finetune"), sample={"ipc": 50},
                             evaluate={"methods": ROWS_50, "ipcs": (50,), "seeds": p["seeds_50"],
                                       "epochs": p["epochs"][50]}),
        "soft-ipc10": linked(cfg, root, "soft", ("latents", "finetune", "samples", "teacher"),
                             evaluate={"protocol": "soft", "methods": ROWS_SOFT}),
        "full": linked(cfg, root, "full", ("latents",), evaluate={"methods": ("full",), "seeds": (0,),
                                                                  "epochs": p["epochs"]["full"],
                                                                  "diagnostics": False}),
    }
    runs = {k: v for k, v in runs.items() if k in p.get("runs", runs)}
    walls, rows, diagnostics, tables, pairs = {}, [], [], [], []
    for name, rcfg in runs.items():
        stages = ("evaluate",) if name == "full" else None
        with common.Stopwatch() as sw:
            made = run.main(rcfg, stages=stages)
        walls[name] = round(sw.seconds, 1)
        result = made["evaluate"]
        rows += [{**r, "epochs": rcfg.evaluate.epochs} for r in result["rows"]]
        diagnostics += [{**d, "protocol": rcfg.evaluate.protocol} for d in result.get("diagnostics", [])]
        pairs += paired(result["trials"], name)
        tables.append(f"## {name}\n\n{result['table_markdown']}")
        common.log.info("%s: %.0f s\n%s", name, sw.seconds, result["table_markdown"])
    common.stop_ray()
    result = {
        "rows": rows,
        "diagnostics": diagnostics,
        "paired": pairs,
        "settings": {"epochs": {str(k): v for k, v in p["epochs"].items()}, "seeds": list(p["seeds"]),
                     "seeds_ipc50": list(p["seeds_50"]), "evals": p["evals"],
                     "teacher": f"{cfg.evaluate.teacher_arch}, {p['teacher_epochs']} epochs",
                     "augment": cfg.evaluate.augment, "finetune_steps": cfg.finetune.steps,
                     "finetune_trainable": cfg.finetune.trainable, "finetune_lr": cfg.finetune.lr,
                     "ema": f"{cfg.finetune.ema_decay} warm-up={cfg.finetune.ema_warmup}",
                     "lambda": [cfg.finetune.minimax.lambda_rep, cfg.finetune.minimax.lambda_div],
                     "guidance_scale": cfg.sample.guidance_scale, "oversample": cfg.sample.oversample,
                     "sampler": f"{cfg.sample.scheduler}-{cfg.sample.steps}", "root": root,
                     "max_per_class": p["max_per_class"]},
        "anchors_hard_convnet3": ANCHORS,
        "wall_seconds": walls,
        "quick": args.quick,
        "preset": "quick" if args.quick else "cpu" if args.cpu else "full",
        "machine": common.finish_facts(facts),
    }
    common.write_json(args.out, common.rnd(result))
    print("\n\n".join(tables))
    print("\npaired differences (a - b, per seed):")
    for d in pairs:
        print(f"  {d['run']} {d['a']} - {d['b']}: {d['mean']:+.2f} ± {d['std']} "
              f"({d['a_wins']}/{len(d['seeds'])} seeds) {d['a_minus_b']}")


if __name__ == "__main__":
    main()
