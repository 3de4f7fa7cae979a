"""Typed configs, one dataclass per stage, validated once at the boundary.

The defaults *are* the embedded default: Fashion-MNIST in pixel space, the shipped small DiT,
minimax fine-tuning, sampling and evaluation on a laptop. The paper's recipes (jobs/) derive
from these with ``dataclasses.replace``. Every field carries its documentation in
``metadata["doc"]``; the CLI prints it and a test checks it is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from mmdist.errors import ConfigError


def opt(default: Any, doc: str) -> Any:
    """A dataclass field with a default and its documentation."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults so configs stay hashable and frozen")
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _check(ok: bool, name: str, message: str) -> None:
    """Raise a ConfigError naming the field when a check fails."""
    if not ok:
        raise ConfigError(f"{name}: {message}")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the real images come from and how they are shaped."""

    source: Literal["fashion-mnist", "imagefolder", "parquet"] = opt(
        "fashion-mnist",
        "fashion-mnist (IDX files), imagefolder (root/<class>/*.png|jpg) or parquet "
        "(encoded image bytes + class name columns)",
    )
    train: str = opt(
        "/usr/share/datasets/fashion-mnist",
        "train split: the IDX folder for fashion-mnist, an ImageFolder root or Parquet path/URI "
        "(local or s3://)",
    )
    test: str | None = opt(None, "test split (same kinds as train); fashion-mnist reads it from `train`")
    classes: tuple[str, ...] | None = opt(
        None, "class names to keep, in label order (e.g. ImageWoof wnids); None keeps all, sorted"
    )
    model_class_ids: tuple[int, ...] | None = opt(
        None,
        "the backbone's class id for each kept class (ImageNet indices for DiT-XL/2); None means "
        "0..K-1. method.md §1.2: conditioning on a wrong id silently ruins a run",
    )
    image_size: int = opt(28, "square side in pixels after the ADM centre crop")
    channels: Literal[1, 3] = opt(1, "1 keeps grayscale, 3 converts to RGB")
    max_per_class: int | None = opt(None, "keep the first N images of each class (sorted); None keeps all")
    download: bool = opt(True, "fashion-mnist only: fall back to torchvision's downloader if the IDX files are missing")
    val_per_class: int = opt(
        0, "hold out this many train images per class (seeded) as a validation split: encode, random and full "
        "never see them, and evaluate.split=val tests on them (what a search selects on)")

    def __post_init__(self) -> None:
        _check(self.image_size >= 8, "data.image_size", "must be at least 8")
        _check(self.val_per_class >= 0, "data.val_per_class", "must be >= 0")
        _check(self.max_per_class is None or self.max_per_class > 0, "data.max_per_class", "must be positive")
        if self.classes is not None:
            _check(len(self.classes) > 0, "data.classes", "must not be empty")
            _check(len(set(self.classes)) == len(self.classes), "data.classes", "has duplicates")
        if self.model_class_ids is not None:
            _check(self.classes is not None and len(self.model_class_ids) == len(self.classes),
                   "data.model_class_ids", "needs data.classes of the same length")
            _check(min(self.model_class_ids) >= 0, "data.model_class_ids", "must be non-negative")


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """Images -> latent shards (Parquet) with Ray Data."""

    encoder: str = opt(
        "identity",
        "identity (pixel space, for tiny images) or an AutoencoderKL hub id / folder, "
        "e.g. stabilityai/sd-vae-ft-ema (method.md §1.1: fine-tuning encodes with ft-EMA)",
    )
    encoder_subfolder: str | None = opt(None, "subfolder of the VAE inside its repo (e.g. 'vae')")
    scaling_factor: float | None = opt(None, "latent scale; None reads it from the VAE config (0.18215 for SD)")
    shard_rows: int = opt(4096, "rows per Parquet shard; a shard is the unit of resume")
    batch_size: int = opt(64, "images per encoder forward pass")
    num_actors: int = opt(0, "encoder actors; 0 sizes the pool from the cluster's CPUs/GPUs")
    num_gpus_per_actor: float = opt(0.0, "GPUs per encoder actor (fractions share a GPU)")
    dtype: Literal["float32", "float16"] = opt("float32", "storage dtype of latents")
    strict: bool = opt(False, "fail the run on any unreadable image or empty class instead of counting it")
    seed: int = opt(0, "seed of the row shuffle across shards (every shard a uniform sample of the classes)")

    def __post_init__(self) -> None:
        _check(self.shard_rows > 0, "encode.shard_rows", "must be positive")
        _check(self.batch_size > 0, "encode.batch_size", "must be positive")
        _check(self.num_actors >= 0, "encode.num_actors", "must be >= 0")
        _check(self.num_gpus_per_actor >= 0, "encode.num_gpus_per_actor", "must be >= 0")
        _check(self.scaling_factor is None or self.scaling_factor > 0, "encode.scaling_factor", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class MinimaxConfig:
    """The two extra losses of Minimax Diffusion (method.md §1.6-1.7)."""

    representativeness: bool = opt(True, "use R_c = 1 - min cos(prediction, real memory)")
    diversity: bool = opt(True, "use V_c = max cos(prediction, prediction memory)")
    lambda_rep: float = opt(0.002, "weight of R_c (paper --lambda-pos 0.002)")
    lambda_div: float = opt(0.008, "weight of V_c (paper --lambda-neg 0.008)")
    memory_size: int = opt(64, "entries per class in each memory (paper --memory-size 64)")
    memory_dtype: Literal["float32", "bfloat16"] = opt("float32", "storage dtype of the memories")
    center: Literal["none", "dataset_mean"] = opt(
        "dataset_mean",
        "subtract the real data's mean latent before the cosine. Pixel-space cosines saturate "
        "near 1 on the shared background (ray-notes calibration); SD latents are near-centred, "
        "so the paper recipes use none",
    )

    def __post_init__(self) -> None:
        _check(self.lambda_rep >= 0, "finetune.minimax.lambda_rep", "must be >= 0")
        _check(self.lambda_div >= 0, "finetune.minimax.lambda_div", "must be >= 0")
        _check(self.memory_size > 0, "finetune.minimax.memory_size", "must be positive")

    @property
    def enabled(self) -> bool:
        """Whether any minimax term is on."""
        return (self.representativeness and self.lambda_rep > 0) or (self.diversity and self.lambda_div > 0)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What pretraining and fine-tuning share: the Ray Train loop and its optimiser."""

    steps: int = opt(300, "optimiser steps")
    global_batch_size: int = opt(64, "images per step summed over workers (paper: 8)")
    lr: float = opt(1e-3, "AdamW learning rate, constant (paper: 1e-3)")
    weight_decay: float = opt(0.0, "AdamW weight decay (paper: 0)")
    ema_decay: float = opt(0.999, "EMA decay (its ceiling with ema_warmup); sampling uses the EMA weights")
    ema_warmup: bool = opt(
        True,
        "warm the EMA decay up as min(ema_decay, (1 + step) / (10 + step)) (diffusers' EMAModel): a short "
        "run's EMA then holds what it trained. Off, decay**steps of the starting weights stay in the EMA "
        "(the paper: 0.9999 over 12k steps keeps 30 %)",
    )
    hflip: bool = opt(True, "random horizontal flip of the latent (method.md §1.2 flips images)")
    mixed_precision: Literal["no", "bf16"] = opt("no", "bf16 autocast of the forward pass (GPU)")
    num_workers: int = opt(1, "Ray Train workers (DDP ranks)")
    use_gpu: bool = opt(False, "one GPU per worker")
    cpus_per_worker: float | None = opt(None, "CPUs per worker; None sizes it from the cluster")
    checkpoint_every: int = opt(100, "steps between checkpoints (resume points)")
    log_every: int = opt(25, "steps between log lines")
    max_failures: int = opt(2, "worker failures survived by restarting from the last checkpoint")
    seed: int = opt(0, "global seed; rank r uses derive_seed(seed, stage, r)")

    def __post_init__(self) -> None:
        _check(self.steps > 0, f"{self._section}.steps", "must be positive")
        _check(self.global_batch_size > 0, f"{self._section}.global_batch_size", "must be positive")
        _check(self.num_workers > 0, f"{self._section}.num_workers", "must be positive")
        _check(self.global_batch_size % self.num_workers == 0, f"{self._section}.global_batch_size",
               f"({self.global_batch_size}) must be divisible by num_workers ({self.num_workers})")
        _check(self.lr > 0, f"{self._section}.lr", "must be positive")
        _check(0 <= self.ema_decay < 1, f"{self._section}.ema_decay", "must be in [0, 1)")
        _check(self.checkpoint_every > 0, f"{self._section}.checkpoint_every", "must be positive")
        _check(self.log_every > 0, f"{self._section}.log_every", "must be positive")
        _check(self.cpus_per_worker is None or self.cpus_per_worker > 0,
               f"{self._section}.cpus_per_worker", "must be positive")

    _section = "train"


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(TrainConfig):
    """Train a class-conditional DiT from scratch on the latents (our own backbone)."""

    model: str = opt("fashion-mnist", "DiT size from mmdist.models.diffusion.DIT_SIZES (has 'tiny')")
    learn_sigma: bool = opt(True, "predict the variance too (8 output channels on DiT-XL/2)")
    class_dropout: float = opt(0.1, "label dropout for classifier-free guidance (DiT: 0.1)")
    steps: int = opt(5000, "optimiser steps (the shipped backbone: 5000)")
    global_batch_size: int = opt(128, "images per step")
    lr: float = opt(1e-3, "AdamW learning rate")
    ema_decay: float = opt(0.999, "EMA decay ceiling; the shipped weights are the EMA")
    checkpoint_every: int = opt(500, "steps between checkpoints")
    log_every: int = opt(100, "steps between log lines")
    _section = "pretrain"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.class_dropout < 1, "pretrain.class_dropout", "must be in [0, 1)")
        from mmdist.models.diffusion import DIT_SIZES

        _check(self.model in DIT_SIZES, "pretrain.model",
               f"unknown DiT size {self.model!r}; choose from {sorted(DIT_SIZES)}")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainConfig):
    """Minimax fine-tuning of a pretrained DiT (method.md §1)."""

    backbone: str = opt(
        "embedded",
        "embedded (the shipped Fashion-MNIST DiT), pretrain (this run's pretrain stage), or a "
        "DiTTransformer2DModel hub id / folder (facebook/DiT-XL-2-256 with subfolder transformer)",
    )
    backbone_subfolder: str | None = opt(None, "subfolder of the backbone inside its repo")
    trainable: Literal["difffit", "full"] = opt(
        "difffit", "difffit: biases, scale factors in the first half of the blocks, class table (paper)"
    )
    minimax: MinimaxConfig = opt(MinimaxConfig(), "the minimax losses")
    class_dropout: float = opt(0.1, "label dropout kept on during fine-tuning (method.md §1.4)")
    _section = "finetune"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.class_dropout < 1, "finetune.class_dropout", "must be in [0, 1)")

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
class SampleConfig:
    """IPC images per class with classifier-free guidance, fanned out over Ray actors."""

    ipc: int = opt(10, "images per class; smaller IPCs are the first k images of this generation")
    classes: tuple[str, ...] | None = opt(None, "class names to sample; None samples every class")
    batch_size: int = opt(32, "images per sampler forward pass within a class")
    scheduler: Literal["ddpm", "ddim", "dpm"] = opt("ddpm", "ddpm: the paper's ancestral sampler with learned variance")
    steps: int = opt(50, "sampling steps (paper: 50, respaced like ADM)")
    guidance_scale: float = opt(
        2.0, "classifier-free guidance scale (paper: 4.0 for DiT-XL/2; 2.0 measured best for the embedded DiT)"
    )
    guidance_channels: int | None = opt(
        None, "guide only the first N latent channels (DiT and the paper: 3 of 4); None guides all"
    )
    use_ema: bool = opt(True, "sample from the EMA weights (method.md §1.10)")
    decoder: str | None = opt(
        None, "VAE that decodes samples (paper: stabilityai/sd-vae-ft-mse); None uses encode.encoder"
    )
    baseline: bool = opt(True, "also sample the un-fine-tuned backbone (the paper's 'diffusion' row) even when "
                               "evaluate.methods does not list it")
    oversample: int = opt(
        4, "<method>+select variants (beyond the paper, opt-in): draw oversample x ipc candidates per class and keep "
        "the ipc that best cover the class's real latents (greedy facility location on centred cosines)")
    select_reference: int = opt(512, "+select: real latents per class that the selection covers")
    seed: int = opt(0, "image k of class c uses derive_seed(seed, 'sample', c, k)")
    num_actors: int = opt(0, "sampling actors; 0 sizes the pool from the cluster")
    num_gpus_per_actor: float = opt(0.0, "GPUs per actor; 0.5 puts two actors on one GPU")
    mixed_precision: Literal["no", "bf16", "fp16"] = opt("no", "autocast during sampling (GPU)")

    def __post_init__(self) -> None:
        _check(self.ipc > 0, "sample.ipc", "must be positive")
        _check(self.batch_size > 0, "sample.batch_size", "must be positive")
        _check(self.steps > 0, "sample.steps", "must be positive")
        _check(self.guidance_scale >= 1.0, "sample.guidance_scale", "must be >= 1 (1 disables guidance)")
        _check(self.num_actors >= 0, "sample.num_actors", "must be >= 0")
        _check(self.guidance_channels is None or self.guidance_channels > 0, "sample.guidance_channels",
               "must be positive")
        _check(self.oversample >= 1, "sample.oversample", "must be >= 1 (candidates per kept image)")
        _check(self.select_reference > 0, "sample.select_reference", "must be positive")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Train test networks on distilled sets and test on real data, as a Ray Tune grid."""

    protocol: Literal["hard", "soft"] = opt("hard", "hard: IDC one-hot recipe; soft: RDED teacher relabelling")
    methods: tuple[str, ...] = opt(
        ("minimax", "diffusion", "random"),
        "rows of the table. Generated: minimax (the paper), finetune (same fine-tuning, both lambdas 0), "
        "representativeness / diversity (one term only), diffusion (no fine-tuning), and <any of these>+select "
        "(sample.oversample candidates, the best-covering ipc kept). Real: random (a random subset per seed), "
        "full (the whole train split), distilled (evaluate.distilled)",
    )
    split: Literal["test", "val"] = opt(
        "test", "where accuracy is measured: test, or val (data.val_per_class images held out of the train split; "
        "what a hyperparameter search must select on)")
    diagnostics: bool = opt(
        True, "for every generated set: the teacher's accuracy on it (class fidelity) and precision / recall / "
        "density / coverage against real train images in the teacher's feature space")
    distilled: str | None = opt(None, "an ImageFolder of distilled images from any method, evaluated as 'distilled'")
    archs: tuple[str, ...] = opt(("convnet",), "test networks from mmdist.models.classifiers (or timm:<name>)")
    ipcs: tuple[int, ...] = opt((10,), "images per class to evaluate")
    seeds: tuple[int, ...] = opt((0, 1), "one trial per seed; the table shows mean ± std")
    epochs: int | None = opt(100, "training epochs; None follows the recipe (hard: 2000/1500/1000 by IPC)")
    resolution: int | None = opt(None, "evaluation resolution (paper: 224 for 256 px data); None = data.image_size")
    batch_size: int = opt(64, "train batch (IDC: 64)")
    lr: float | None = opt(None, "None: the protocol's (hard SGD 0.01, soft AdamW 0.001)")
    evals: int = opt(2, "test passes during training; the best and the last are reported")
    augment: Literal["auto", "idc", "dsa", "rded", "none"] = opt(
        "auto",
        "train-time augmentation, CutMix on top unless none. auto: dsa for <=64 px under hard (IDC's small-image "
        "setting), idc (RandomResizedCrop + flip + colour jitter + lighting) for larger, rded (crop + flip) for soft",
    )
    teacher: str | None = opt(
        None, "soft labels and diagnostics: a teacher folder made by mmdist, or a weights file (.safetensors, or a "
        "torchvision/timm .pth state dict) of evaluate.teacher_arch; None trains one on the real train split")
    teacher_arch: str = opt("convnet", "architecture of the teacher (trained, or of the weights file given)")
    teacher_epochs: int = opt(15, "epochs of teacher training on the real train split")
    temperature: float = opt(20.0, "soft: KL temperature (RDED: 20)")
    cpus_per_trial: float | None = opt(None, "CPUs per trial; None fits one trial per CPU")
    gpus_per_trial: float = opt(0.0, "GPUs per trial (fractions run several trials per GPU)")
    max_failures: int = opt(2, "retries of a failed trial")

    def __post_init__(self) -> None:
        _check(len(self.methods) > 0, "evaluate.methods", "must not be empty")
        bad = [m for m in self.methods if not is_method(m)]
        _check(not bad, "evaluate.methods",
               f"unknown {bad}; choose from {list(EVAL_METHODS)} or <generated>+select")
        _check(len(set(self.methods)) == len(self.methods), "evaluate.methods", "has duplicates")
        _check(self.teacher_epochs > 0, "evaluate.teacher_epochs", "must be positive")
        _check(len(self.archs) > 0, "evaluate.archs", "must not be empty")
        from mmdist.models.classifiers import check_arch

        for arch in self.archs:
            try:
                check_arch(arch)
            except KeyError as e:
                raise ConfigError(f"evaluate.archs: {e.args[0]}") from None
        _check(len(self.ipcs) > 0 and min(self.ipcs) > 0, "evaluate.ipcs", "must be positive")
        _check(len(self.seeds) > 0, "evaluate.seeds", "must not be empty")
        _check(self.epochs is None or self.epochs > 0, "evaluate.epochs", "must be positive")
        _check(self.batch_size > 0, "evaluate.batch_size", "must be positive")
        _check(self.evals > 0, "evaluate.evals", "must be positive")
        _check(self.temperature > 0, "evaluate.temperature", "must be positive")


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
class RayConfig:
    """How to reach (or start) the Ray cluster."""

    address: str | None = opt(None, "cluster address; None uses RAY_ADDRESS or starts a local cluster")
    num_cpus: int | None = opt(None, "CPUs of a local cluster; None uses all")
    num_gpus: int | None = opt(None, "GPUs of a local cluster; None detects them")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run: data -> encode -> (pretrain) -> finetune -> sample -> evaluate."""

    name: str = opt("fashion-mnist", "run name, used in logs and folder names")
    output: str = opt("runs/fashion-mnist", "artifact root: a local folder or s3://bucket/prefix")
    latents: str | None = opt(
        None, "finished latent shards to train on (skips encode); None uses <output>/latents"
    )
    overwrite: bool = opt(False, "redo stages whose artifacts were made by a different config")
    data: DataConfig = opt(DataConfig(), "real data")
    encode: EncodeConfig = opt(EncodeConfig(), "encode stage")
    pretrain: PretrainConfig = opt(PretrainConfig(), "pretrain stage (only when finetune.backbone is 'pretrain')")
    finetune: FinetuneConfig = opt(FinetuneConfig(), "minimax fine-tuning stage")
    sample: SampleConfig = opt(SampleConfig(), "sampling stage")
    evaluate: EvaluateConfig = opt(EvaluateConfig(), "evaluation stage")
    ray: RayConfig = opt(RayConfig(), "Ray cluster")

    def __post_init__(self) -> None:
        _check(bool(self.output), "output", "must not be empty")
        _check(bool(self.name) and "/" not in self.name, "name", "must be non-empty without '/'")
        _check(self.encode.encoder == "identity" or self.data.channels == 3, "data.channels",
               "must be 3 when encode.encoder is a VAE (it takes RGB images)")
        _check(self.sample.ipc <= 10_000, "sample.ipc", "must be at most 10000")
        selects = [m for m in self.evaluate.methods if m.endswith(SELECT)]
        _check(not selects or self.sample.oversample > 1, "sample.oversample",
               f"must be > 1 for {selects[0] if selects else ''} (with 1 there is nothing to select from)")
        _check(self.evaluate.split == "test" or self.data.val_per_class > 0, "evaluate.split",
               "val needs data.val_per_class > 0 (the images to hold out of the train split)")
        big = [k for k in self.evaluate.ipcs if k > self.sample.ipc]
        generated = [m for m in self.evaluate.methods if is_generated(m)]
        _check(not (big and generated), "evaluate.ipcs",
               f"IPC {big[0] if big else ''} is larger than sample.ipc={self.sample.ipc} (the generated sets' size)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; ``Config.from_dict`` inverts it."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build and validate a config from a (YAML/JSON) dict; unknown keys are errors."""
        return from_dict(cls, raw)

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections, used to tell whether an artifact is current."""
        picked = {s: to_dict(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# (De)serialisation and overrides
# ----------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {options}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp} for {name}")


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, naming the field of any error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in raw.items()}
    return cls(**kwargs)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a config."""
    raw = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. sample.ipc=50")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {text!r} ({e.__class__.__name__})") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: unknown field")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"{key}: unknown field")
        node[parts[-1]] = value
    return Config.from_dict(raw)


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
            raw = yaml.safe_load(f)
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
