"""The embedded default: Fashion-MNIST in pixel space, the shipped small DiT, minimax on a laptop.

    python -m jobs.fashion_mnist                       # every stage, local Ray
    ray job submit --working-dir . -- python -m jobs.fashion_mnist sample.ipc=50
"""

from dataclasses import replace

from jobs import run_job
from mmdist.config import Config


def config() -> Config:
    """Config() is the embedded default; only the output folder is named after the job."""
    return replace(Config(), name="fashion-mnist", output="runs/fashion-mnist")


if __name__ == "__main__":
    run_job(config())
