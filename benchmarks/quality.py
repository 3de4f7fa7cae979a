"""Quality benchmark: Fashion-MNIST, ConvNet-3, IPC 10 and 50, random / diffusion / minimax, hard and soft.

    python benchmarks/quality.py [--quick] [--root runs/quality]  ->  benchmarks/results/quality.json

One run, one machine, one set of samples:
- the embedded default's stages (``mmdist.config.Config()``: the shipped ``fashion-mnist`` DiT,
  minimax fine-tuning, DDPM-50 sampling with the default guidance) at IPC 50 with the baseline
  (un-fine-tuned DiT) sampled too; IPC 10 is the first 10 images of every class (issue 5);
- ``hard`` (IDC recipe): minimax, diffusion and random real, ConvNet-3, IPC 10 and 50, 3 seeds;
- ``soft`` (RDED recipe, a ConvNet-3 teacher trained here on the real train split): minimax and
  random real, same grid.

The published recipes train for 1000-2000 epochs (hard) or 300 (soft). One ConvNet-3 step of
batch 64 takes ~0.6 s on this 2-core CPU and one pass over the 10,000 test images ~35 s, so this
benchmark trains for ``FULL["epochs"]`` (80 at IPC 10, 20 at IPC 50: about the same steps; the
same for every method, so rows compare), tests once at the end (best = last), and trains the
teacher for one epoch. The figures are what this budget gives, not the recipes' ceiling.

Every stage is an mmdist artifact under ``--root``: an interrupted run resumes, finished trials
are not redone. Writes a list of rows ``{method, protocol, arch, ipc, mean, std, n, ...}`` under
``rows``, with the settings, the published anchors and wall times.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets RAY_AUTH_MODE and sys.path before Ray or mmdist load)

FMNIST = "/usr/share/datasets/fashion-mnist"
IPCS = (10, 50)
# epochs per IPC: IPC 10 has 2 batches an epoch, IPC 50 has 8 (about the same steps in total)
FULL = dict(epochs={10: 80, 50: 20}, seeds=(0, 1, 2), teacher_epochs=1, evals=1, max_per_class=None,
            finetune_steps=None, sample_steps=None)  # None: the embedded default's
QUICK = dict(epochs={10: 2, 50: 1}, seeds=(0,), teacher_epochs=1, evals=1, max_per_class=100,
             finetune_steps=10, sample_steps=5)
ANCHORS = {  # ConvNet-3 on Fashion-MNIST, hard labels: the DC and DSA papers (docs/method.md §4)
    "random": {10: 73.8, 50: 82.5}, "DC": {10: 82.3, 50: 83.6}, "DSA": {10: 84.6, 50: 88.7}, "whole data": 93.5}
GRID = {"hard": ("minimax", "diffusion", "random"), "soft": ("minimax", "random")}


def base_config(root: str, p: dict) -> object:
    """The embedded default, sampled at the largest IPC; FMNIST from the Debian package."""
    from mmdist.config import Config, absolute_paths

    cfg = Config()
    return absolute_paths(dataclasses.replace(
        cfg, name="bench-quality", output=os.path.join(root, "shared"),
        data=dataclasses.replace(cfg.data, train=FMNIST, download=False, max_per_class=p["max_per_class"]),
        finetune=dataclasses.replace(cfg.finetune, steps=p["finetune_steps"] or cfg.finetune.steps),
        sample=dataclasses.replace(cfg.sample, ipc=max(IPCS), baseline=True,
                                   steps=p["sample_steps"] or cfg.sample.steps),
    ))


def eval_config(cfg: object, root: str, protocol: str, ipc: int, p: dict) -> object:
    """One evaluate run: its own output root whose upstream stages link to the shared ones."""
    out = os.path.join(root, f"{protocol}-ipc{ipc}")
    os.makedirs(out, exist_ok=True)
    for stage in ("latents", "finetune", "samples"):
        link = os.path.join(out, stage)
        if not os.path.lexists(link):
            os.symlink(os.path.join(cfg.output, stage), link)
    e = dataclasses.replace(cfg.evaluate, protocol=protocol, methods=GRID[protocol], archs=("convnet",),
                            ipcs=(ipc,), seeds=p["seeds"], epochs=p["epochs"][ipc], evals=p["evals"],
                            teacher=os.path.join(root, "teacher") if protocol == "soft" else None,
                            teacher_epochs=p["teacher_epochs"])
    return dataclasses.replace(cfg, output=out, evaluate=e)


def teacher(cfg: object, root: str, p: dict) -> dict:
    """Train the soft protocol's teacher once (mmdist's own teacher code) into <root>/teacher."""
    from mmdist import datasets, evaluate, storage

    folder = os.path.join(root, "teacher")
    if not os.path.exists(os.path.join(folder, "manifest.json")):
        staged = dataclasses.replace(cfg, output=os.path.join(root, "teacher-run"), evaluate=dataclasses.replace(
            cfg.evaluate, protocol="soft", teacher=None, teacher_epochs=p["teacher_epochs"]))
        test = datasets.load_images(cfg.data, datasets.index_split(cfg.data, "test").items, "test")
        evaluate.teacher_state(staged, test, cfg.data.image_size)
        made = os.path.join(staged.output, "teacher")
        os.replace(os.path.join(made, os.listdir(made)[0]), folder)
    return storage.read_json(os.path.join(folder, "manifest.json"))


def main() -> None:
    """Sample once at IPC 50, train the teacher, evaluate the four (protocol, IPC) grids, write JSON."""
    args = common.parse_args(__doc__, "quality", root=True)
    p = QUICK if args.quick else FULL
    root = os.path.abspath(args.root or ("runs/quality-quick" if args.quick else "runs/quality"))
    facts = common.machine_facts()
    common.set_torch_threads(1)
    from mmdist import encode, evaluate, finetune, sample

    cfg = base_config(root, p)
    common.start_ray(num_cpus=os.cpu_count() or 2)
    walls: dict[str, float] = {}
    rows: list[dict] = []
    for name, stage in (("encode", encode), ("finetune", finetune), ("sample", sample)):
        with common.Stopwatch() as sw:
            made = stage.main(cfg)
        walls[name] = made.get("wall_seconds", sw.seconds)
        common.log.info("%s: %.0f s", name, walls[name])
    with common.Stopwatch() as sw:
        teacher_meta = teacher(cfg, root, p)
    walls["teacher"] = sw.seconds
    common.log.info("teacher test accuracy %.2f%%", teacher_meta["test_acc"])
    for protocol in GRID:
        for ipc in IPCS:
            made = evaluate.main(eval_config(cfg, root, protocol, ipc, p))
            walls[f"evaluate {protocol} ipc{ipc}"] = made["wall_seconds"]
            rows += made["rows"]
            print(made["table_markdown"])
    common.stop_ray()
    result = {
        "rows": [{**r, "epochs": p["epochs"][r["ipc"]]} for r in rows],
        "settings": {"epochs": p["epochs"], "seeds": list(p["seeds"]), "evals": p["evals"],
                     "teacher_epochs": p["teacher_epochs"], "teacher_test_acc": teacher_meta["test_acc"],
                     "finetune_steps": cfg.finetune.steps, "guidance_scale": cfg.sample.guidance_scale,
                     "sampler": f"{cfg.sample.scheduler}-{cfg.sample.steps}", "root": root,
                     "max_per_class": p["max_per_class"]},
        "anchors_hard_convnet3": ANCHORS,
        "wall_seconds": walls,
        "quick": args.quick,
        "machine": common.finish_facts(facts),
    }
    common.write_json(args.out, common.rnd(result))
    for r in result["rows"]:
        print(f"{r['protocol']:5s} {r['method']:9s} IPC {r['ipc']:3d}: {r['mean']:.2f} ± {r['std']:.2f} (n={r['n']})")


if __name__ == "__main__":
    main()
