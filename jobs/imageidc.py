"""ImageIDC, IDC's 10-class subset (docs/method.md §3.1, table §4), with the ImageWoof recipe.

    ray job submit --working-dir . -- python -m jobs.imageidc \
        data.train=s3://my-bucket/imagenet/train data.test=s3://my-bucket/imagenet/val \
        output=s3://my-bucket/mmdist/imageidc
"""

from dataclasses import replace

from jobs import imagewoof, run_job
from mmdist.config import Config
from mmdist.imagenet import class_lists


def config() -> Config:
    """jobs.imagewoof with the first 10 classes of IDC's ImageNet-100 list."""
    base = imagewoof.config()
    classes, ids = class_lists("imageidc")
    return replace(base, name="imageidc", output="s3://YOUR-BUCKET/mmdist/imageidc",
                   data=replace(base.data, classes=classes, model_class_ids=ids))


if __name__ == "__main__":
    run_job(config())
