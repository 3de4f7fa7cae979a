"""Typed configs, one dataclass per stage, validated once at the boundary.

The defaults *are* the embedded default: Fashion-MNIST in pixel space, the shipped small DiT,
minimax fine-tuning, sampling and evaluation on a laptop. The paper's recipes (jobs/) derive
from these with ``dataclasses.replace``. Every field is made by ``opt(default, doc, **checks)``
(mmdist.fields): its documentation, range, finiteness, registry or kind live on the field, and
every section enforces them when it is constructed; ``_checks`` methods hold what spans fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from mmdist.errors import ConfigError
from mmdist.fields import _show, check_fields, coerce, opt


def _check(ok: bool, name: str, message: str) -> None:
    """Raise a ConfigError naming the field when a cross-field check fails."""
    if not ok:
        raise ConfigError(f"{name}: {message}")


def _dit_size(name: str) -> None:
    """Registry check: a DiT size of mmdist.models.diffusion.DIT_SIZES."""
    from mmdist.models.diffusion import DIT_SIZES

    if name not in DIT_SIZES:
        raise KeyError(f"unknown DiT size {name!r}; choose from {sorted(DIT_SIZES)}")


def _arch(name: str) -> None:
    """Registry check: a test network of mmdist.models.classifiers (or timm:<name>)."""
    from mmdist.models.classifiers import check_arch

    check_arch(name)


def _eval_method(name: str) -> None:
    """Registry check: a row of the evaluation table (EVAL_METHODS, or <generated>+select)."""
    if not is_method(name):
        raise KeyError(f"unknown method {name!r}; choose from {list(EVAL_METHODS)} or <generated>+select")


SEED = dict(ge=0, lt=2**32)  # numpy's default_rng and torch.manual_seed both take these


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


class _Section:
    """Base of every section: ``__post_init__`` enforces each field's declared checks, then ``_checks``."""

    _section = ""  # the dotted name of this section in Config (for error messages)

    def __post_init__(self) -> None:
        check_fields(self, self._section)
        self._checks()

    def _checks(self) -> None:
        """Checks across fields of this section (ranges are declared on the fields)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
    """Where the real images come from and how they are shaped."""

    source: Literal["fashion-mnist", "imagefolder", "parquet"] = opt(
        "fashion-mnist",
        "fashion-mnist (IDX files), imagefolder (root/<class>/*.png|jpg) or parquet "
        "(encoded image bytes + class name columns)",
    )
    train: str = opt(
        "/usr/share/datasets/fashion-mnist",
        "train split: the IDX folder for fashion-mnist, an ImageFolder root or Parquet path/URI "
        "(local or s3://)", kind="uri",
    )
    test: str | None = opt(None, "test split (same kinds as train); fashion-mnist reads it from `train`", kind="uri")
    classes: tuple[str, ...] | None = opt(
        None, "class names to keep, in label order (e.g. ImageWoof wnids); None keeps all, sorted",
        kind="text", nonempty=True, unique=True,
    )
    model_class_ids: tuple[int, ...] | None = opt(
        None,
        "the backbone's class id for each kept class (ImageNet indices for DiT-XL/2); None means "
        "0..K-1. docs/method.md §1.2: conditioning on a wrong id silently ruins a run", ge=0, nonempty=True,
    )
    image_size: int = opt(28, "square side in pixels after the ADM centre crop", ge=8, le=4096)
    channels: Literal[1, 3] = opt(1, "1 keeps grayscale, 3 converts to RGB")
    max_per_class: int | None = opt(None, "keep the first N images of each class (sorted); None keeps all", ge=1)
    download: bool = opt(True, "fashion-mnist only: fall back to torchvision's downloader if the IDX files are missing")
    val_per_class: int = opt(
        0, "hold out this many train images per class (seeded) as a validation split: encode, random and full "
        "never see them, and evaluate.split=val tests on them (what a search selects on)", ge=0)
    _section = "data"

    def _checks(self) -> None:
        if self.model_class_ids is not None:
            _check(self.classes is not None and len(self.model_class_ids) == len(self.classes),
                   "data.model_class_ids", "needs data.classes of the same length")


@dataclass(frozen=True, kw_only=True)
class EncodeConfig(_Section):
    """Images -> latent shards (Parquet) with Ray Data."""

    encoder: str = opt(
        "identity",
        "identity (pixel space, for tiny images) or an AutoencoderKL hub id / folder, "
        "e.g. stabilityai/sd-vae-ft-ema (docs/method.md §1.1: fine-tuning encodes with ft-EMA)", kind="uri",
    )
    encoder_subfolder: str | None = opt(None, "subfolder of the VAE inside its repo (e.g. 'vae')", kind="uri")
    scaling_factor: float | None = opt(None, "latent scale; None reads it from the VAE config (0.18215 for SD)",
                                       gt=0)
    shard_rows: int = opt(4096, "rows per Parquet shard; a shard is the unit of resume", ge=1)
    batch_size: int = opt(64, "images per encoder forward pass", ge=1)
    num_actors: int = opt(0, "encoder actors; 0 sizes the pool from the cluster's CPUs/GPUs", result=False, ge=0)
    num_gpus_per_actor: float = opt(0.0, "GPUs per encoder actor (fractions share a GPU)", ge=0, le=8)
    pipeline: Literal["auto", "on", "off"] = opt(
        "auto", "on: Ray Data tasks read and decode, the actors only encode, tasks write (the stages overlap); off: "
        "each actor reads, decodes, encodes and writes its shard; auto: on where the actors hold GPUs (on CPUs the "
        "stages share the same cores: off measured 2x faster, benchmarks/data.py)", result=False)
    dtype: Literal["float32", "float16"] = opt("float32", "storage dtype of latents")
    strict: bool = opt(False, "fail the run on any unreadable image or empty class instead of counting it")
    seed: int = opt(0, "seed of the row shuffle across shards (every shard a uniform sample of the classes)", **SEED)
    _section = "encode"


@dataclass(frozen=True, kw_only=True)
class MinimaxConfig(_Section):
    """The two extra losses of Minimax Diffusion (docs/method.md §1.6-1.7)."""

    representativeness: bool = opt(True, "use R_c = 1 - min cos(prediction, real memory)")
    diversity: bool = opt(True, "use V_c = max cos(prediction, prediction memory)")
    lambda_rep: float = opt(0.002, "weight of R_c (paper --lambda-pos 0.002)", ge=0)
    lambda_div: float = opt(0.008, "weight of V_c (paper --lambda-neg 0.008)", ge=0)
    memory_size: int = opt(64, "entries per class in each memory (paper --memory-size 64)", ge=1)
    memory_dtype: Literal["float32", "bfloat16"] = opt("float32", "storage dtype of the memories")
    center: Literal["none", "dataset_mean"] = opt(
        "dataset_mean",
        "subtract the real data's mean latent before the cosine. Pixel-space cosines saturate "
        "near 1 on the shared background (docs/ray-notes.md, calibration); SD latents are near-centred, "
        "so the paper recipes use none",
    )
    _section = "finetune.minimax"

    @property
    def enabled(self) -> bool:
        """Whether any minimax term is on."""
        return (self.representativeness and self.lambda_rep > 0) or (self.diversity and self.lambda_div > 0)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Section):
    """What pretraining and fine-tuning share: the Ray Train loop and its optimiser."""

    steps: int = opt(300, "optimiser steps", ge=1)
    global_batch_size: int = opt(64, "images per step summed over workers (paper: 8)", ge=1)
    lr: float = opt(1e-3, "AdamW learning rate, constant (paper: 1e-3)", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (paper: 0)", ge=0)
    ema_decay: float = opt(0.999, "EMA decay (its ceiling with ema_warmup); sampling uses the EMA weights",
                           ge=0, lt=1)
    ema_warmup: bool = opt(
        True,
        "warm the EMA decay up as min(ema_decay, (1 + step) / (10 + step)) (diffusers' EMAModel): a short "
        "run's EMA then holds what it trained. Off, decay**steps of the starting weights stay in the EMA "
        "(the paper: 0.9999 over 12k steps keeps 30 %)",
    )
    hflip: bool = opt(True, "random horizontal flip of the latent (docs/method.md §1.2 flips images)")
    mixed_precision: Literal["no", "bf16"] = opt("no", "bf16 autocast of the forward pass (GPU)")
    num_workers: int = opt(1, "Ray Train workers (DDP ranks)", ge=1)
    use_gpu: bool = opt(False, "one GPU per worker")
    cpus_per_worker: float | None = opt(None, "CPUs per worker; None sizes it from the cluster", gt=0)
    checkpoint_every: int = opt(100, "steps between checkpoints (resume points)", result=False, ge=1)
    log_every: int = opt(25, "steps between log lines", ge=1)
    max_failures: int = opt(2, "worker failures survived by restarting from the last checkpoint", result=False,
                            ge=0)
    seed: int = opt(0, "global seed; rank r uses derive_seed(seed, stage, r)", **SEED)
    _section = "train"

    def _checks(self) -> None:
        _check(self.global_batch_size % self.num_workers == 0, f"{self._section}.global_batch_size",
               f"({self.global_batch_size}) must be divisible by num_workers ({self.num_workers})")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(TrainConfig):
    """Train a class-conditional DiT from scratch on the latents (our own backbone)."""

    model: str = opt("fashion-mnist", "DiT size from mmdist.models.diffusion.DIT_SIZES (has 'tiny')",
                     registry=_dit_size)
    learn_sigma: bool = opt(True, "predict the variance too (8 output channels on DiT-XL/2)")
    class_dropout: float = opt(0.1, "label dropout for classifier-free guidance (DiT: 0.1)", ge=0, lt=1)
    steps: int = opt(5000, "optimiser steps (the shipped backbone: 5000)", ge=1)
    global_batch_size: int = opt(128, "images per step", ge=1)
    lr: float = opt(1e-3, "AdamW learning rate", gt=0)
    ema_decay: float = opt(0.999, "EMA decay ceiling; the shipped weights are the EMA", ge=0, lt=1)
    checkpoint_every: int = opt(500, "steps between checkpoints", result=False, ge=1)
    log_every: int = opt(100, "steps between log lines", ge=1)
    _section = "pretrain"


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainConfig):
    """Minimax fine-tuning of a pretrained DiT (docs/method.md §1)."""

    backbone: str = opt(
        "embedded",
        "embedded (the shipped Fashion-MNIST DiT), pretrain (this run's pretrain stage), or a "
        "DiTTransformer2DModel hub id / folder (facebook/DiT-XL-2-256 with subfolder transformer)", kind="uri",
    )
    backbone_subfolder: str | None = opt(None, "subfolder of the backbone inside its repo", kind="uri")
    trainable: Literal["difffit", "full"] = opt(
        "full", "full: every weight (the embedded default; docs/method.md §6). difffit: biases, scale factors in "
        "the first half of the blocks, class table (the paper; jobs.imagewoof)"
    )
    lr: float = opt(1e-4, "AdamW learning rate, constant (the paper: 1e-3 with difffit; 1e-4 with full)", gt=0)
    minimax: MinimaxConfig = opt(MinimaxConfig(), "the minimax losses")
    class_dropout: float = opt(0.1, "label dropout kept on during fine-tuning (docs/method.md §1.4)", ge=0, lt=1)
    class_phases: int = opt(
        0, "0 fine-tunes one model on every class; K > 0 splits the classes (in label order) into phases of K, "
        "each its own model and Ray Train run of `steps` steps on only its classes, run side by side as the "
        "cluster allows: the paper's route to ImageNet-1K (K=20; docs/method.md §1.11). K >= the class count "
        "is one phase", ge=0)
    _section = "finetune"

    def variant(self, method: str) -> FinetuneConfig:
        """This fine-tuning with the loss weights of an ablation row (everything else identical)."""
        mm = self.minimax
        weights = {"minimax": (mm.lambda_rep, mm.lambda_div), "finetune": (0.0, 0.0),
                   "representativeness": (mm.lambda_rep, 0.0), "diversity": (0.0, mm.lambda_div)}
        if method not in weights:
            raise ConfigError(f"{method!r} is not a fine-tuned method; choose from {sorted(weights)}")
        rep, div = weights[method]
        return dataclasses.replace(self, minimax=dataclasses.replace(mm, lambda_rep=rep, lambda_div=div))


@dataclass(frozen=True, kw_only=True)
class SampleConfig(_Section):
    """IPC images per class with classifier-free guidance, fanned out over Ray actors."""

    ipc: int = opt(10, "images per class; smaller IPCs are the first k images of this generation", ge=1, le=10_000)
    classes: tuple[str, ...] | None = opt(None, "class names to sample; None samples every class",
                                          kind="text", nonempty=True, unique=True)
    batch_size: int = opt(32, "images per sampler forward pass within a class", ge=1)
    scheduler: Literal["ddpm", "ddim", "dpm"] = opt("ddpm", "ddpm: the paper's ancestral sampler with learned variance")
    steps: int = opt(50, "sampling steps (paper: 50, respaced like ADM)", ge=1, le=1000)
    guidance_scale: float = opt(
        1.5, "classifier-free guidance scale (paper: 4.0 for DiT-XL/2; 1.5 beat 2.0 on every seed for the "
        "embedded DiT, docs/quality.md); 1 disables guidance", ge=1,
    )
    guidance_channels: int | None = opt(
        None, "guide only the first N latent channels (DiT and the paper: 3 of 4); None guides all", ge=1,
    )
    use_ema: bool = opt(True, "sample from the EMA weights (docs/method.md §1.10)")
    decoder: str | None = opt(
        None, "VAE that decodes samples (paper: stabilityai/sd-vae-ft-mse); None uses encode.encoder", kind="uri",
    )
    baseline: bool = opt(True, "also sample the un-fine-tuned backbone (the paper's 'diffusion' row) even when "
                               "evaluate.methods does not list it")
    oversample: int = opt(
        4, "<method>+select variants (beyond the paper, opt-in): draw oversample x ipc candidates per class and keep "
        "the ipc that best cover the class's real latents (greedy facility location on centred cosines)", ge=1)
    select_reference: int = opt(512, "+select: real latents per class that the selection covers", ge=1)
    seed: int = opt(0, "image k of class c uses derive_seed(seed, 'sample', c, k)", **SEED)
    num_actors: int = opt(0, "sampling actors; 0 sizes the pool from the cluster", result=False, ge=0)
    num_gpus_per_actor: float = opt(0.0, "GPUs per actor; 0.5 puts two actors on one GPU", ge=0, le=8)
    mixed_precision: Literal["no", "bf16", "fp16"] = opt("no", "autocast during sampling (GPU)")
    _section = "sample"


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(_Section):
    """Train test networks on distilled sets and test on real data, as a Ray Tune grid."""

    protocol: Literal["hard", "soft"] = opt("hard", "hard: IDC one-hot recipe; soft: RDED teacher relabelling")
    methods: tuple[str, ...] = opt(
        ("minimax", "diffusion", "random"),
        "rows of the table. Generated: minimax (the paper), finetune (same fine-tuning, both lambdas 0), "
        "representativeness / diversity (one term only), diffusion (no fine-tuning), and <any of these>+select "
        "(sample.oversample candidates, the best-covering ipc kept). Real: random (a random subset per seed), "
        "full (the whole train split), distilled (evaluate.distilled)",
        registry=_eval_method, nonempty=True, unique=True,
    )
    split: Literal["test", "val"] = opt(
        "test", "where accuracy is measured: test, or val (data.val_per_class images held out of the train split; "
        "what a hyperparameter search must select on)")
    diagnostics: bool = opt(
        True, "for every generated set: the teacher's accuracy on it (class fidelity) and precision / recall / "
        "density / coverage against real train images in the teacher's feature space")
    distilled: str | None = opt(None, "an ImageFolder of distilled images from any method, evaluated as 'distilled'",
                                kind="uri")
    archs: tuple[str, ...] = opt(("convnet",), "test networks from mmdist.models.classifiers (or timm:<name>)",
                                 registry=_arch, nonempty=True, unique=True)
    ipcs: tuple[int, ...] = opt((10,), "images per class to evaluate", ge=1, le=10_000, nonempty=True, unique=True)
    seeds: tuple[int, ...] = opt((0, 1), "one trial per seed; the table shows mean ± std", nonempty=True,
                                 unique=True, **SEED)
    epochs: int | None = opt(100, "training epochs; None follows the recipe (hard: 2000/1500/1000 by IPC)", ge=1)
    resolution: int | None = opt(None, "evaluation resolution (paper: 224 for 256 px data); None = data.image_size",
                                 ge=8, le=4096)
    batch_size: int = opt(64, "train batch (IDC: 64)", ge=1)
    lr: float | None = opt(None, "None: the protocol's (hard SGD 0.01, soft AdamW 0.001)", gt=0)
    evals: int = opt(2, "test passes during training; the best and the last are reported", ge=1)
    augment: Literal["auto", "idc", "dsa", "rded", "none"] = opt(
        "auto",
        "train-time augmentation, CutMix on top unless none. auto: dsa for <=64 px under hard (IDC's small-image "
        "setting), idc (RandomResizedCrop + flip + colour jitter + lighting) for larger, rded (crop + flip) for soft",
    )
    teacher: str | None = opt(
        None, "soft labels and diagnostics: a teacher folder made by mmdist, or a weights file (.safetensors, or a "
        "torchvision/timm .pth state dict) of evaluate.teacher_arch; None trains one on the real train split",
        kind="uri")
    teacher_arch: str = opt("convnet_w32", "architecture of the teacher (trained, or of the weights file given)",
                            registry=_arch)
    teacher_epochs: int = opt(5, "epochs of teacher training on the real train split (the embedded default's "
                              "teacher ships trained: mmdist/assets/teachers)", ge=1)
    temperature: float = opt(20.0, "soft: KL temperature (RDED: 20)", gt=0)
    cpus_per_trial: float | None = opt(None, "CPUs per trial; None fits one trial per CPU", gt=0)
    gpus_per_trial: float = opt(0.0, "GPUs per trial (fractions run several trials per GPU)", ge=0, le=8)
    max_failures: int = opt(2, "retries of a failed trial", result=False, ge=0)
    _section = "evaluate"

    def _checks(self) -> None:
        _check("distilled" not in self.methods or bool(self.distilled), "evaluate.methods",
               "'distilled' needs evaluate.distilled (an ImageFolder)")


# Rows of the evaluation. Generated sets come from a fine-tuned variant of the backbone (or the
# backbone itself); the ablations differ from minimax only in the two loss weights.
GENERATED_METHODS = ("minimax", "finetune", "representativeness", "diversity", "diffusion")
FINETUNED_METHODS = ("minimax", "finetune", "representativeness", "diversity")
REAL_METHODS = ("random", "full", "distilled")
EVAL_METHODS = GENERATED_METHODS + REAL_METHODS
SELECT = "+select"


def base_method(method: str) -> str:
    """The generated method a +select variant draws its candidates from (itself otherwise)."""
    return method[: -len(SELECT)] if method.endswith(SELECT) else method


def is_method(method: str) -> bool:
    """A known row name: one of EVAL_METHODS or <generated method>+select."""
    return method in EVAL_METHODS or (method.endswith(SELECT) and base_method(method) in GENERATED_METHODS)


def is_generated(method: str) -> bool:
    """Whether a row is a sampled set (and so has samples/<method>/)."""
    return base_method(method) in GENERATED_METHODS


@dataclass(frozen=True, kw_only=True)
class RayConfig(_Section):
    """How to reach (or start) the Ray cluster."""

    address: str | None = opt(None, "cluster address; None uses RAY_ADDRESS or starts a local cluster", kind="uri")
    num_cpus: int | None = opt(None, "CPUs of a local cluster; None uses all", ge=1)
    num_gpus: int | None = opt(None, "GPUs of a local cluster; None detects them", ge=0)
    _section = "ray"


@dataclass(frozen=True, kw_only=True)
class Config(_Section):
    """A whole run: data -> encode -> (pretrain) -> finetune -> sample -> evaluate."""

    name: str = opt("fashion-mnist", "run name, used in logs and folder names", kind="text")
    output: str = opt("runs/fashion-mnist", "artifact root: a local folder or s3://bucket/prefix", kind="uri")
    latents: str | None = opt(
        None, "finished latent shards to train on (skips encode); None uses <output>/latents", kind="uri",
    )
    overwrite: bool = opt(False, "redo stages whose artifacts were made by a different config")
    data: DataConfig = opt(DataConfig(), "real data")
    encode: EncodeConfig = opt(EncodeConfig(), "encode stage")
    pretrain: PretrainConfig = opt(PretrainConfig(), "pretrain stage (only when finetune.backbone is 'pretrain')")
    finetune: FinetuneConfig = opt(FinetuneConfig(), "minimax fine-tuning stage")
    sample: SampleConfig = opt(SampleConfig(), "sampling stage")
    evaluate: EvaluateConfig = opt(EvaluateConfig(), "evaluation stage")
    ray: RayConfig = opt(RayConfig(), "Ray cluster")
    tracking: Literal["tensorboard", "mlflow"] = opt(
        "tensorboard",
        "experiment tracking of training steps and evaluation trials: tensorboard (event files under the "
        "output, always written) or mlflow (also MLflow runs; needs pip install 'mmdist[mlflow]')",
    )
    tracking_uri: str | None = opt(
        None, "MLflow tracking URI (http://host:5000, databricks, sqlite:///path); None: <output>/mlruns", kind="uri",
    )
    preview_every: int = opt(
        100, "training steps between preview grids (EMA and raw weights, a few images per class) written to "
        "<stage>/previews and the tracker; 0 turns them off", ge=0,
    )

    def _checks(self) -> None:
        """Checks across sections: everything a later stage would find out after hours of work."""
        _check(bool(self.output), "output", "must not be empty")
        _check(bool(self.name) and "/" not in self.name, "name", "must be non-empty without '/'")
        _check(self.encode.encoder == "identity" or self.data.channels == 3, "data.channels",
               "must be 3 when encode.encoder is a VAE (it takes RGB images)")
        d, s, e = self.data, self.sample, self.evaluate
        if d.classes is not None and s.classes is not None:
            unknown = [c for c in s.classes if c not in d.classes]
            _check(not unknown, "sample.classes", f"{unknown[0]!r} is not in data.classes" if unknown else "")
        selects = [m for m in e.methods if m.endswith(SELECT)]
        _check(not selects or s.oversample > 1, "sample.oversample",
               f"must be > 1 for {selects[0] if selects else ''} (with 1 there is nothing to select from)")
        _check(e.split == "test" or d.val_per_class > 0, "evaluate.split",
               "val needs data.val_per_class > 0 (the images to hold out of the train split)")
        big = [k for k in e.ipcs if k > s.ipc]
        generated = [m for m in e.methods if is_generated(m)]
        _check(not (big and generated), "evaluate.ipcs",
               f"IPC {big[0] if big else ''} is larger than sample.ipc={s.ipc} (the generated sets' size)")

    def check_stages(self, stages: list[str] | tuple[str, ...]) -> None:
        """Checks across the stages about to run, before Ray starts (a run must not fail after hours).

        Separate from construction: encoding or sampling with a small data.max_per_class is fine,
        evaluating a random row of more images than that is not.
        """
        d, e = self.data, self.evaluate
        if "evaluate" not in stages:
            return
        top = max(e.ipcs)
        _check("random" not in e.methods or d.max_per_class is None or top <= d.max_per_class, "evaluate.ipcs",
               f"IPC {top} is larger than data.max_per_class={d.max_per_class}, the real images per class "
               "the random row draws from")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; ``Config.from_dict`` inverts it."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build and validate a config from a (YAML/JSON) dict; unknown keys are errors."""
        return from_dict(cls, raw)

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections' result fields, used to tell whether an artifact is
        current (fields made with ``result=False`` say how to run, not what is made: left out)."""
        picked = {s: to_dict(getattr(self, s), results_only=True) for s in sections}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# (De)serialisation and overrides
# ----------------------------------------------------------------------------------------------


def to_dict(obj: Any, results_only: bool = False) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively; ``results_only`` leaves out the fields
    that do not change what a stage makes (``opt(..., result=False)``)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name), results_only) for f in dataclasses.fields(obj)
                if not results_only or f.metadata.get("result", True)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v, results_only) for v in obj]
    return obj


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, naming the field of any error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k if isinstance(k, str) and k.isidentifier() else _show(k)) for k in raw if k not in fields)
    if unknown:
        known = [f"{prefix}{f}" for f in fields] + [name for name, _, _ in describe(cls, prefix)]
        raise ConfigError(unknown_field(f"{prefix}{unknown[0]}", known))
    kwargs = {k: coerce(hints[k], v, f"{prefix}{k}", from_dict) for k, v in raw.items()}
    return cls(**kwargs)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-4 as the number it is. YAML 1.1's float pattern needs a dot
    (1.0e-4), so `finetune.lr=1e-4` arrived as the string '1e-4' and was refused; YAML 1.2, JSON
    and Python all read it as a float."""


_YamlLoader.add_implicit_resolver(  # copies the resolver table for this class; SafeLoader is untouched
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml(text: Any) -> Any:
    """Parse YAML text or a file object with ``_YamlLoader``."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a config."""
    raw = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. sample.ipc=50")
        key, text = item.split("=", 1)
        try:
            value = _yaml(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {text!r} ({e.__class__.__name__})") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(unknown_field(key, [name for name, _, _ in describe()]))
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(unknown_field(key, [name for name, _, _ in describe()]))
        node[parts[-1]] = value
    return Config.from_dict(raw)


def unknown_field(name: str, known: list[str]) -> str:
    """'<name>: unknown field' with the closest known names, e.g. 'did you mean sample.ipc?'."""
    import difflib

    leaf = name.rsplit(".", 1)[-1]
    # a right name in the wrong section (sample.lr -> finetune.lr), else the nearest spellings
    close = difflib.get_close_matches(name, known, 2, 0.8) + [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    close = list(dict.fromkeys(close))[:3]
    return f"{name}: unknown field" + (f" (did you mean {' or '.join(close)}?)" if close else "")


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str, base: Config | None = None) -> Config:
    """Load a YAML config file; its keys override ``base`` (the embedded default if None)."""
    try:
        with open(path) as f:
            raw = _yaml(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path}: malformed YAML{at}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return Config.from_dict(merge(to_dict(base or Config()), raw))


def absolute_paths(cfg: Config) -> Config:
    """Make local paths absolute, so that Ray workers (other working directories) find them."""
    import os

    def fix(path: str | None, must_exist: bool = False) -> str | None:
        if path is None or "://" in path or os.path.isabs(path):
            return path
        if must_exist and not os.path.exists(path):
            return path  # a hub id such as facebook/DiT-XL-2-256
        return os.path.abspath(path)

    return dataclasses.replace(
        cfg, output=fix(cfg.output), latents=fix(cfg.latents),
        data=dataclasses.replace(cfg.data, train=fix(cfg.data.train), test=fix(cfg.data.test)),
        encode=dataclasses.replace(cfg.encode, encoder=fix(cfg.encode.encoder, must_exist=True)),
        sample=dataclasses.replace(cfg.sample, decoder=fix(cfg.sample.decoder, must_exist=True)),
        finetune=dataclasses.replace(cfg.finetune, backbone=fix(cfg.finetune.backbone, must_exist=True)),
        evaluate=dataclasses.replace(cfg.evaluate, distilled=fix(cfg.evaluate.distilled),
                                     teacher=fix(cfg.evaluate.teacher)),
    )


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every leaf field, for `mmdist config --help`."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += describe(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("doc", "")))
    return rows
