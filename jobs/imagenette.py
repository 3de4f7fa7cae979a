"""ImageNette (docs/method.md §3.1, table §4) with the ImageWoof recipe; only the classes differ.

    ray job submit --working-dir . -- python -m jobs.imagenette \
        data.train=s3://my-bucket/imagenet/train data.test=s3://my-bucket/imagenet/val \
        output=s3://my-bucket/mmdist/imagenette
"""

from dataclasses import replace

from jobs import imagewoof, run_job
from mmdist.config import Config
from mmdist.imagenet import class_lists


def config() -> Config:
    """jobs.imagewoof with ImageNette's wnids and ImageNet indices."""
    base = imagewoof.config()
    classes, ids = class_lists("imagenette")
    return replace(base, name="imagenette", output="s3://YOUR-BUCKET/mmdist/imagenette",
                   data=replace(base.data, classes=classes, model_class_ids=ids))


if __name__ == "__main__":
    run_job(config())
