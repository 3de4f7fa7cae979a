"""A user's own small ImageFolder and a backbone pretrained here: samples a classifier recognises."""

import os

from conftest import smoke_config
from helpers import GLYPHS, glyphs_folder

from mmdist import run


def test_own_data_with_our_pretrained_backbone_gives_recognisable_samples(ray_cluster, tmp_path):
    """Issue 12 item 6: glyphs no public backbone has seen, a tiny DiT pretrained for 400 steps with
    the default EMA (warm-up), sampled: the teacher trained on the real glyphs calls most samples
    by their class (chance is 25 %). Without the EMA warm-up these samples are noise."""
    train = glyphs_folder(str(tmp_path / "train"), 150, size=8, seed=0)
    test = glyphs_folder(str(tmp_path / "test"), 30, size=8, seed=1)
    cfg = smoke_config(
        str(tmp_path / "out"),
        data={"source": "imagefolder", "train": train, "test": test, "classes": None, "max_per_class": None,
              "channels": 1, "image_size": 8},
        encode={"shard_rows": 256},
        pretrain={"model": "tiny", "steps": 400, "global_batch_size": 32, "lr": 5e-3, "checkpoint_every": 400,
                  "log_every": 100},
        sample={"ipc": 10, "steps": 25, "batch_size": 10},
        evaluate={"methods": ["minimax", "diffusion", "random"], "ipcs": [10], "teacher_arch": "convnet_w32",
                  "teacher_epochs": 30},
    )
    results = run.main(cfg)
    assert results["encode"]["classes"] == sorted(GLYPHS)
    assert results["pretrain"]["ema_start_share"] == 0.0  # warm-up: nothing of the random init is sampled
    diagnosed = {d["method"]: d for d in results["evaluate"]["diagnostics"]}
    assert diagnosed["random"]["fidelity"] >= 90  # the teacher knows the real glyphs
    for method in ("minimax", "diffusion"):
        assert diagnosed[method]["fidelity"] >= 50, diagnosed[method]
    assert os.path.exists(os.path.join(cfg.output, "samples", "minimax", "grid.png"))
