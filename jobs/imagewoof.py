"""ImageWoof with the paper's recipe (docs/method.md §1-§3): DiT-XL/2-256, DiffFit + minimax, IDC evaluation.

    ray job submit --working-dir . -- python -m jobs.imagewoof \
        data.train=s3://my-bucket/imagenet/train data.test=s3://my-bucket/imagenet/val \
        output=s3://my-bucket/mmdist/imagewoof

data.train / data.test: ImageNet-1K train and val trees with one folder per wnid (val re-sorted into
class folders). The original ImageNet classes, not fastai's smaller release (author, issue #4).
"""

from dataclasses import replace

from jobs import run_job
from mmdist.config import Config
from mmdist.imagenet import class_lists


def config() -> Config:
    """The official run.sh settings, on one GPU per stage actor."""
    base = Config()
    classes, ids = class_lists("imagewoof")
    minimax = replace(base.finetune.minimax, lambda_rep=0.002, lambda_div=0.008, memory_size=64,
                      center="none")  # SD latents are near-centred; the paper compares them raw
    return replace(
        base, name="imagewoof", output="s3://YOUR-BUCKET/mmdist/imagewoof",
        data=replace(base.data, source="imagefolder", train="s3://YOUR-BUCKET/imagenet/train",
                     test="s3://YOUR-BUCKET/imagenet/val", classes=classes, model_class_ids=ids,
                     image_size=256, channels=3),
        # §1.1: the released pipeline encodes with ft-EMA and decodes with ft-MSE
        encode=replace(base.encode, encoder="stabilityai/sd-vae-ft-ema", encoder_subfolder=None,
                       num_gpus_per_actor=1),
        # §1.3-1.10: DiffFit set, AdamW 1e-3 / wd 0, global batch 8, 12k steps, EMA 0.9999, fp32
        finetune=replace(base.finetune, backbone="facebook/DiT-XL-2-256", backbone_subfolder="transformer",
                         trainable="difffit", steps=12000, global_batch_size=8, lr=1e-3, weight_decay=0.0,
                         ema_decay=0.9999, class_dropout=0.1, mixed_precision="no", num_workers=1,
                         use_gpu=True, checkpoint_every=1000, log_every=500, minimax=minimax),
        # §2: DDPM-50 with learned variance, CFG 4.0 on 3 of 4 channels, 100 per class, EMA weights
        sample=replace(base.sample, ipc=100, batch_size=50, scheduler="ddpm", steps=50, guidance_scale=4.0,
                       guidance_channels=3, use_ema=True, decoder="stabilityai/sd-vae-ft-mse",
                       baseline=True, num_gpus_per_actor=1),
        # §3.3: IDC hard labels at 224 px, epochs by IPC (2000/1500/1000), a test pass every
        # epochs/100 (best over training is reported); 4 trials share a GPU
        evaluate=replace(base.evaluate, protocol="hard", methods=("minimax", "diffusion", "random"),
                         archs=("convnet", "resnet_ap10", "resnet18"), ipcs=(10, 20, 50, 70, 100),
                         seeds=(0, 1, 2), epochs=None, evals=100, resolution=224, gpus_per_trial=0.25),
    )


if __name__ == "__main__":
    run_job(config())
