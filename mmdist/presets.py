"""Named variants of the default config that the CLI can select (``--smoke``)."""

from __future__ import annotations

from dataclasses import replace

from mmdist.config import Config


def smoke(base: Config | None = None) -> Config:
    """Tiny everything, for tests and CI: 2 classes, 16 px, a tiny DiT, 2 steps per stage."""
    base = base or Config()
    return replace(
        base,
        name="smoke",
        output=base.output if base.output != Config().output else "runs/smoke",
        data=replace(base.data, classes=("T-shirt/top", "Trouser"), max_per_class=48, image_size=16),
        encode=replace(base.encode, shard_rows=32),
        pretrain=replace(base.pretrain, model="tiny", steps=2, global_batch_size=8, checkpoint_every=2,
                         log_every=1),
        finetune=replace(base.finetune, backbone="pretrain", steps=2, global_batch_size=8, checkpoint_every=2,
                         log_every=1, minimax=replace(base.finetune.minimax, memory_size=8)),
        sample=replace(base.sample, ipc=2, steps=4, batch_size=2, guidance_scale=2.0),
        evaluate=replace(base.evaluate, ipcs=(2,), seeds=(0,), epochs=2, evals=1, methods=("minimax", "random"),
                         teacher_arch="tiny", teacher_epochs=2),
    )
