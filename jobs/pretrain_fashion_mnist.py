"""The recipe of the embedded backbone: a small DiT pretrained from scratch on Fashion-MNIST.

    python -m jobs.pretrain_fashion_mnist            # ~2 h on one CPU core
    cp -r runs/pretrain-fashion-mnist/pretrain/model_ema/* mmdist/assets/dit-fashion-mnist/
"""

from dataclasses import replace

from mmdist.config import Config


def config() -> Config:
    """Encode Fashion-MNIST in pixel space and pretrain DiT 'fashion-mnist' (6 layers, patch 4)."""
    base = Config()
    return replace(
        base,
        name="pretrain-fashion-mnist",
        output="runs/pretrain-fashion-mnist",
        pretrain=replace(base.pretrain, model="fashion-mnist", steps=5000, global_batch_size=128,
                         lr=1e-3, ema_decay=0.999, checkpoint_every=250, log_every=100),
        finetune=replace(base.finetune, backbone="pretrain"),
    )


if __name__ == "__main__":
    from jobs import run_job

    run_job(config(), stages=("encode", "pretrain"))
