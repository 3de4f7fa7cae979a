"""Stage 5 — evaluate: method x architecture x IPC x seed as a Ray Tune grid; mean ± std tables.

Methods: ``minimax`` and ``diffusion`` (the sampled sets), ``random`` (a random real subset per
seed, the field's baseline under the same recipe), ``full`` (the whole train split), and
``distilled`` (any ImageFolder given as ``evaluate.distilled``). IPC k of a sampled set is its
first k images per class. Each trial trains one test network under the protocol (hard or soft,
``mmdist.protocols``) and writes its result file; a rerun skips finished trials. Results go to
results.{md,csv,json} and accuracy.png (``mmdist.tables``), and every row names its protocol;
the teacher for soft labels and diagnostics is ``mmdist.teacher``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from mmdist import artifacts, datasets, protocols, schema, storage, tracking
from mmdist.config import Config, is_generated, to_dict
from mmdist.errors import ArtifactError, ConfigError, DataError
from mmdist.models import classifiers
from mmdist.seeding import derive_seed
from mmdist.tables import aggregate, diagnostics_markdown, markdown, write_tables
from mmdist.teacher import build_model, check_teacher, teacher_note, teacher_state

log = logging.getLogger("mmdist")


# ----------------------------------------------------------------------------------------------
# Data for the trials
# ----------------------------------------------------------------------------------------------


def _sampled_set(cfg: Config, variant: str, ipc: int, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The first ``ipc`` images per class of a sampled variant (from its Parquet copy)."""
    import pyarrow.parquet as pq

    from mmdist.sample import decode_png

    folder = storage.join(artifacts.stage_dir(cfg, "sample"), variant)
    manifest = storage.read_json(storage.join(folder, schema.MANIFEST))
    if manifest["ipc"] < ipc:
        raise ConfigError(f"evaluate.ipcs: IPC {ipc} is larger than the {manifest['ipc']} images per class "
                          f"sampled for {variant} (raise sample.ipc)")
    _check_classes(variant, [c["class"] for c in manifest["classes"]], classes)
    images, labels = [], []
    uris = [storage.join(folder, "parquet", f"{entry['folder']}.parquet") for entry in manifest["classes"]]
    for entry, uri, data in zip(manifest["classes"], uris, storage.read_many(uris)):  # one class per file
        if isinstance(data, Exception):
            raise ArtifactError(f"{storage.redact(uri)}: cannot be read ({data})")
        table = pq.read_table(io.BytesIO(data), columns=[schema.PNG, schema.INDEX]).sort_by(schema.INDEX)
        pngs = table.column(schema.PNG).to_pylist()[:ipc]
        images += [decode_png(p) for p in pngs]
        labels += [classes.index(entry["class"])] * len(pngs)
    return np.stack(images), np.array(labels, dtype=np.int64)


def _folder_set(cfg: Config, root: str, ipc: int, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The first ``ipc`` files per class (sorted names) of any distilled ImageFolder.

    A folder matches a class by its name or by ``storage.safe_name`` of it (class names such as
    'T-shirt/top' cannot be folder names), so a samples/<variant>/images tree qualifies.
    """
    data = replace(cfg.data, source="imagefolder", train=root, classes=None, model_class_ids=None,
                   max_per_class=None)
    index = datasets.index_split(data, "train")
    to_class = {storage.safe_name(c): c for c in classes} | {c: c for c in classes}
    named = [to_class.get(folder, folder) for folder in index.classes]
    _check_classes(root, named, classes)
    by_class = {to_class.get(f, f): [i for i in index.items if i.class_name == f] for f in index.classes}
    short = {c: len(items) for c, items in by_class.items() if len(items) < ipc}
    if short:
        raise ConfigError(f"evaluate.ipcs: IPC {ipc} is larger than the images available in {root} "
                          f"(e.g. {next(iter(short))!r} has {next(iter(short.values()))})")
    items = [it for c in classes for it in by_class[c][:ipc]]
    x, _ = datasets.load_images(data, items)
    return x, np.array([classes.index(to_class.get(it.class_name, it.class_name)) for it in items], dtype=np.int64)


def _random_set(cfg: Config, train: datasets.SplitIndex, ipc: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``ipc`` random real train images per class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    by_class = [[it for it in train.items if it.label == k] for k in range(len(train.classes))]
    short = [train.classes[k] for k, members in enumerate(by_class) if len(members) < ipc]
    if short:
        raise ConfigError(f"evaluate.ipcs: IPC {ipc} is larger than the real images of class {short[0]!r}")
    items = [members[i] for members in by_class for i in sorted(rng.choice(len(members), ipc, replace=False))]
    return datasets.load_images(cfg.data, items, "train")


def _check_classes(source: str, got: list[str], want: tuple[str, ...]) -> None:
    """The distilled set must have exactly the test set's classes."""
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise DataError(f"{source}: classes differ from the test set's (missing {missing[:5]}, extra {extra[:5]})")


def set_key(method: str, ipc: int, seed: int) -> tuple:
    """The key of a trial's training set: (method, ipc, seed), seed None where the set has no seed."""
    return (method, ipc, seed if method == "random" else None)


def build_sets(cfg: Config, test_classes: tuple[str, ...],
               keys: set[tuple]) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """``set_key`` -> uint8 images and labels, for the keys the trials to run need."""
    e = cfg.evaluate
    sets: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    train = datasets.index_split(cfg.data, "train") if any(k[0] in ("random", "full") for k in keys) else None
    for method, ipc, seed in sorted(keys, key=str):
        if is_generated(method):
            sets[(method, ipc, None)] = _sampled_set(cfg, method, ipc, test_classes)
        elif method == "distilled":
            sets[(method, ipc, None)] = _folder_set(cfg, e.distilled, ipc, test_classes)
        elif method == "random":
            sets[(method, ipc, seed)] = _random_set(cfg, train, ipc, seed)
        elif method == "full":
            sets[("full", 0, None)] = datasets.load_images(cfg.data, train.items, "train")
    return sets


def trial_specs(cfg: Config) -> list[dict[str, Any]]:
    """Every (method, arch, ipc, seed) of the grid ('full' has no IPC)."""
    e = cfg.evaluate
    specs = []
    for method in e.methods:
        for arch in e.archs:
            for ipc in ((0,) if method == "full" else e.ipcs):
                for seed in e.seeds:
                    specs.append({"method": method, "arch": arch, "ipc": ipc, "seed": seed,
                                  "key": f"{method}-{arch.replace(':', '_')}-ipc{ipc}-seed{seed}"})
    return specs


# ----------------------------------------------------------------------------------------------
# One trial (runs in a Ray Tune worker)
# ----------------------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], shared: dict[str, Any]) -> None:
    """Train and test one network; report to Tune and write the trial's result file."""
    import ray
    from ray import tune

    cfg = Config.from_dict(shared["config"])
    spec = params["trial"]
    torch.set_num_threads(shared["threads"])
    e = cfg.evaluate
    device = torch.device("cuda" if torch.cuda.is_available() and e.gpus_per_trial > 0 else "cpu")
    key = set_key(spec["method"], spec["ipc"], spec["seed"])
    # arrays from the object store are read-only; torch wants writable memory
    x, y = (np.array(a) for a in ray.get(shared["sets"][key]))
    tx, ty = (np.array(a) for a in ray.get(shared["test"]))
    res = shared["resolution"]
    num_classes = len(shared["classes"])
    protocol = protocols.make_protocol(e.protocol, ipc=spec["ipc"] or 10_000, num_classes=num_classes,
                                       epochs=e.epochs, batch_size=e.batch_size, lr=e.lr, evals=e.evals,
                                       augment=e.augment, temperature=e.temperature, resolution=res)
    torch.manual_seed(spec["seed"])  # the network's initialisation depends on the trial seed alone
    model = classifiers.create(spec["arch"], in_channels=x.shape[1], num_classes=num_classes,
                               image_size=res).to(device)
    teacher = None
    if protocol.soft:
        teacher = build_model(ray.get(shared["teacher"]), x.shape[1], num_classes, res).to(device)
    start = time.time()
    out = protocols.fit(model, protocols.to_float(torch.from_numpy(x), res).to(device), torch.from_numpy(y).to(device),
                        protocols.to_float(torch.from_numpy(tx), res).to(device), torch.from_numpy(ty).to(device),
                        protocol, seed=spec["seed"], teacher=teacher, report=tune.report)
    row = {**{k: spec[k] for k in ("method", "arch", "ipc", "seed")}, "protocol": protocol.name,
           "epochs": protocol.epochs, "best_acc": out["best_acc"], "last_acc": out["last_acc"],
           "curve": out["curve"], "started": start, "finished": time.time(),
           "seconds": round(time.time() - start, 1), "fingerprint": shared["fp"]}
    storage.write_json(storage.join(shared["folder"], "trials", f"{spec['key']}.json"), row)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, Any]:
    """Run the grid (skipping finished trials), then write the tables and the plot."""
    from mmdist import ray_runtime

    e = cfg.evaluate
    if "distilled" in e.methods and not e.distilled:
        raise ConfigError("evaluate.methods: 'distilled' needs evaluate.distilled (an ImageFolder)")
    upstream = []
    if any(is_generated(m) for m in e.methods):
        upstream.append(artifacts.require(artifacts.stage_dir(cfg, "sample"), "sample"))
    if "distilled" in e.methods:
        upstream.append(artifacts.folder_fingerprint(e.distilled))
    folder = artifacts.stage_dir(cfg, "evaluate")
    fp = fingerprint(cfg, upstream)
    done = artifacts.existing(folder, "evaluate", fp, cfg, cfg.overwrite)
    specs = trial_specs(cfg)
    diag_keys = diagnostic_keys(cfg)
    if done and {s["key"] for s in specs} <= {t_key(t) for t in done["trials"]} and \
            set(map(str, diag_keys)) <= {str((d["method"], d["ipc"])) for d in done.get("diagnostics", [])}:
        log.info("evaluate: %s is complete, skipping", folder)
        return done
    artifacts.lease(folder, "evaluate")  # also when adding rows to a finished evaluation (no-op if held)
    if e.teacher:
        check_teacher(cfg)
    start = time.time()
    test_index = datasets.index_split(cfg.data, e.split)
    classes = test_index.classes
    res = e.resolution or cfg.data.image_size
    finished = {}
    for spec in specs:
        uri = storage.join(folder, "trials", f"{spec['key']}.json")
        if storage.exists(uri) and storage.read_json(uri).get("fingerprint") == fp:
            finished[spec["key"]] = storage.read_json(uri)
    todo = [s for s in specs if s["key"] not in finished]
    prior = {(d["method"], d["ipc"]): d for d in (done or {}).get("diagnostics", [])}
    diag_todo = [k for k in diag_keys if k not in prior]
    mlflow_uri = tracking.mlflow_uri(cfg) if todo else None
    log.info("evaluate: %d trials (%d to run), protocol %s, %s set of %d images",
             len(specs), len(todo), e.protocol, e.split, len(test_index.items))
    test = None
    teacher = None
    if todo or diag_todo:
        keys = {set_key(s["method"], s["ipc"], s["seed"]) for s in todo}
        keys |= {set_key(m, ipc, e.seeds[0]) for m, ipc in diag_todo}
        sets = build_sets(cfg, classes, keys)
        test = datasets.load_images(cfg.data, test_index.items, e.split)
        ray_runtime.connect(cfg)
        if e.protocol == "soft" or diag_todo:
            teacher = teacher_state(cfg, test, res)
        for method, ipc in diag_todo:
            prior[(method, ipc)] = {"method": method, "ipc": ipc,
                                    **_diagnose(cfg, teacher, sets[set_key(method, ipc, e.seeds[0])], res)}
        if todo:
            _run_grid(cfg, todo, sets, test, classes, res, folder, fp, teacher, mlflow_uri)
        for spec in todo:
            finished[spec["key"]] = storage.read_json(storage.join(folder, "trials", f"{spec['key']}.json"))
    rows = aggregate([finished[s["key"]] for s in specs])
    diagnostics = [prior[k] for k in diag_keys]
    table = markdown(rows)
    if diagnostics:
        table += "\n\n" + diagnostics_markdown(diagnostics, teacher_note(teacher))
    write_tables(folder, rows, table, diagnostics)
    wall = time.time() - start
    return artifacts.publish(folder, "evaluate", fp, cfg, rows=rows, table_markdown=table,
                             trials=[finished[s["key"]] for s in specs], diagnostics=diagnostics,
                             wall_seconds=round(wall, 2),
                             accelerator_seconds=round(wall * e.gpus_per_trial * len(todo), 2))


def fingerprint(cfg: Config, upstream: list[dict[str, Any]]) -> str:
    """The evaluation's inputs: its section except the list of rows, the data, and the samples.

    The rows are left out so that adding a method to a finished evaluation runs only its trials;
    every trial file carries this fingerprint and the rows it belongs to are in its name.
    """
    import hashlib

    own = {k: v for k, v in to_dict(cfg.evaluate, results_only=True).items() if k != "methods"}
    text = json.dumps({"evaluate": own, "data": to_dict(cfg.data, results_only=True),
                       "upstream": [m["fingerprint"] for m in upstream]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def t_key(trial: dict[str, Any]) -> str:
    """The spec key of a finished trial's result."""
    return f"{trial['method']}-{trial['arch'].replace(':', '_')}-ipc{trial['ipc']}-seed{trial['seed']}"


def diagnostic_keys(cfg: Config) -> list[tuple[str, int]]:
    """(method, ipc) of the sets diagnosed: every generated row, and random real as the reference."""
    e = cfg.evaluate
    if not e.diagnostics:
        return []
    methods = [m for m in e.methods if is_generated(m) or m == "random"]
    return [(m, ipc) for m in methods for ipc in e.ipcs]


def _diagnose(cfg: Config, teacher: dict[str, Any], data: tuple[np.ndarray, np.ndarray], res: int) -> dict:
    """Fidelity and PRDC of one set against the real train images (a fixed sample per class)."""
    from mmdist import diagnostics

    global _REFERENCE
    if _REFERENCE is None or _REFERENCE[0] != (cfg.fingerprint("data"), res, teacher["key"]):
        train = datasets.index_split(cfg.data, "train")
        rng = np.random.default_rng(derive_seed(0, "diagnostics"))
        by_class: dict[int, list] = {k: [] for k in range(len(train.classes))}
        for it in train.items:
            by_class[it.label].append(it)
        items = []
        for k, members in by_class.items():
            items += [members[i] for i in sorted(rng.permutation(len(members))[:diagnostics.REFERENCE_PER_CLASS])]
        x, y = datasets.load_images(cfg.data, items, "train")
        model = build_model(teacher, x.shape[1], len(train.classes), res)
        feats, _ = diagnostics.features(model, x, res)
        _REFERENCE = ((cfg.fingerprint("data"), res, teacher["key"]), feats, y, model)
    _, feats, y, model = _REFERENCE
    return diagnostics.diagnose(model, data[0], data[1], (feats, y), res)


_REFERENCE = None


def _run_grid(cfg: Config, todo: list[dict], sets: dict, test: tuple, classes: tuple[str, ...], res: int,
              folder: str, fp: str, teacher: dict[str, Any] | None, mlflow_uri: str | None = None) -> None:
    """The Ray Tune grid over the unfinished trials (fractional resources, retries)."""
    import ray
    from ray import tune
    from tqdm import tqdm

    from mmdist import ray_runtime, ray_work

    e = cfg.evaluate
    cpus = ray_runtime.trial_cpus(e.cpus_per_trial, len(todo))  # Tune runs as many at once as fit
    shared = {"config": cfg.to_dict(), "sets": {k: ray.put(v) for k, v in sets.items()}, "test": ray.put(test),
              "teacher": ray.put(teacher if e.protocol == "soft" else None), "classes": list(classes),
              "resolution": res, "folder": folder,
              "fp": fp, "threads": ray_runtime.torch_threads(cpus)}
    storage_path = storage.join(folder, "tune")
    if not storage.is_remote(storage_path):
        storage_path = os.path.abspath(storage_path)

    class _Progress(tune.Callback):
        """A progress bar over finished trials (not pickled with Tune's experiment state)."""

        bar = None

        def __getstate__(self) -> dict:
            return {}

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _Progress.bar.update()

    trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared),
                                    {"cpu": cpus, "gpu": e.gpus_per_trial})
    tuner = tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(metric="best_acc", mode="max"),
        run_config=tune.RunConfig(name=f"eval-{fp}", storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=e.max_failures),
                                  callbacks=[_Progress(), *tracking.tune_callbacks(cfg, mlflow_uri, "evaluate")]),
    )
    _Progress.bar = tqdm(total=len(todo), desc="evaluate trials", unit="trial")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new console prints a banner whatever `verbose` says
    grid = ray_work.off_main_thread(tuner.fit)
    _Progress.bar.close()
    if grid.errors:
        raise grid.errors[0]
