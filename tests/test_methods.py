"""The rows of an evaluation: ablation variants, +select, the validation split (no Ray)."""

import pytest
from helpers import image_folder

from mmdist import datasets, finetune, sample
from mmdist.config import Config, apply_overrides
from mmdist.errors import ConfigError, DataError


@pytest.mark.parametrize("override, field", [
    ("evaluate.methods=[minimax,nope]", "evaluate.methods"),
    ("evaluate.methods=[random+select]", "evaluate.methods"),  # selection is for generated sets
    ("evaluate.methods=[minimax,minimax]", "evaluate.methods"),
    ("sample.oversample=0", "sample.oversample"),
    ("evaluate.split=val", "evaluate.split"),  # without data.val_per_class
    ("evaluate.ipcs=[50]", "evaluate.ipcs"),  # more than sample.ipc=10 generated images per class
    ("data.val_per_class=-1", "data.val_per_class"),
])
def test_bad_rows_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        apply_overrides(Config(), [override])


def test_select_needs_candidates_to_select_from():
    with pytest.raises(ConfigError, match="^sample.oversample: must be > 1 for minimax\\+select"):
        apply_overrides(Config(), ["evaluate.methods=[minimax+select]", "sample.oversample=1"])
    cfg = apply_overrides(Config(), ["evaluate.methods=[minimax+select,diffusion+select]"])
    assert cfg.sample.oversample > 1


def test_ablations_differ_from_minimax_only_in_the_loss_weights():
    ft = Config().finetune
    variants = {m: ft.variant(m) for m in ("minimax", "finetune", "representativeness", "diversity")}
    weights = {m: (v.minimax.lambda_rep, v.minimax.lambda_div) for m, v in variants.items()}
    assert weights == {"minimax": (0.002, 0.008), "finetune": (0.0, 0.0), "representativeness": (0.002, 0.0),
                       "diversity": (0.0, 0.008)}
    assert not variants["finetune"].minimax.enabled
    for v in variants.values():  # everything else, seed and data order included, is the same run
        assert (v.steps, v.seed, v.lr, v.global_batch_size, v.ema_decay) == (ft.steps, ft.seed, ft.lr,
                                                                             ft.global_batch_size, ft.ema_decay)
    with pytest.raises(ConfigError, match="not a fine-tuned method"):
        ft.variant("diffusion")


def test_rows_decide_what_is_fine_tuned_and_sampled():
    cfg = apply_overrides(Config(), ["evaluate.methods=[random,diversity,minimax+select,finetune+select]",
                                     "sample.baseline=false"])
    assert finetune.variants(cfg) == ["minimax", "finetune", "diversity"]
    assert sample.variant_names(cfg) == ["minimax", "diversity", "minimax+select", "finetune+select"]
    cfg = apply_overrides(Config(), ["evaluate.methods=[random]"])
    assert finetune.variants(cfg) == ["minimax"] and sample.variant_names(cfg) == ["minimax", "diffusion"]


def test_validation_split_is_held_out_of_train(tmp_path):
    root = image_folder(str(tmp_path / "train"), {"a": 12, "b": 9}, size=8, mode="L")
    cfg = apply_overrides(Config(), ["data.source=imagefolder", f"data.train={root}", f"data.test={root}",
                                     "data.val_per_class=3", "data.channels=1", "data.image_size=8"])
    train, val = datasets.index_split(cfg.data, "train"), datasets.index_split(cfg.data, "val")
    assert train.counts() == {"a": 9, "b": 6} and val.counts() == {"a": 3, "b": 3}
    assert not {i.source_id for i in train.items} & {i.source_id for i in val.items}
    assert [i.source_id for i in datasets.index_split(cfg.data, "val").items] == [i.source_id for i in val.items]
    small = apply_overrides(cfg, ["data.val_per_class=9"])
    with pytest.raises(DataError, match="class 'b' has 9 train images"):
        datasets.index_split(small.data, "train")


def test_a_sweep_that_would_select_on_the_test_split_is_refused():
    from mmdist import sweep

    cfg = apply_overrides(Config(), ["evaluate.split=test"])
    with pytest.raises(ConfigError, match="^evaluate.split: a sweep selects on the validation split"):
        sweep.main(cfg, {"sample.guidance_scale": 2.0})
    import importlib

    job = importlib.import_module("jobs.sweep").config()
    assert job.evaluate.split == "val" and job.data.val_per_class > 0
