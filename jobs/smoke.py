"""Tiny everything on CPU (2 classes, 16 px, tiny DiT, 2 steps): what CI submits to a real cluster.

    python -m jobs.smoke output=/tmp/smoke
    ray job submit --working-dir . -- python -m jobs.smoke output=/tmp/smoke
"""

from dataclasses import replace

from jobs import run_job
from mmdist.config import Config
from mmdist.presets import smoke


def config() -> Config:
    """The smoke preset, writing under runs/smoke."""
    return smoke(replace(Config(), output="runs/smoke"))


if __name__ == "__main__":
    run_job(config())
