"""`mmdist data`: make the configured data set readable on this machine, before any stage runs.

Fashion-MNIST (the embedded default) comes from the IDX files in ``data.train``; where they are
missing, from Debian's ``dataset-fashion-mnist`` package when this is a Debian-like machine and we
are root (the package registries are reachable where the internet may not be), else from
torchvision's download. Other sources are only checked. Either way both splits are indexed, so a
missing or empty split is reported here, in one line, rather than minutes into a run.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Any

from mmdist import datasets
from mmdist.config import Config, DataConfig
from mmdist.errors import DataError

log = logging.getLogger("mmdist")

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FOLDER = "/usr/share/datasets/fashion-mnist"


def apt_install(package: str) -> None:
    """``apt-get install`` a package as root (updating the package lists if it is not known yet)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # --reinstall: the package may be registered as installed while its files are gone
    install = ["apt-get", "install", "-y", "-qq", "--reinstall", package]
    log.info("data: %s", " ".join(install))
    quiet = dict(env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)  # never the terminal
    done = subprocess.run(install, **quiet)
    if done.returncode != 0:  # a fresh machine has empty package lists
        subprocess.run(["apt-get", "update", "-qq"], **quiet)
        done = subprocess.run(install, **quiet)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise DataError(f"apt-get install {package} failed: {last}")


def fetch_fashion_mnist(cfg: DataConfig) -> str:
    """Make the Fashion-MNIST IDX files readable; returns where they came from."""
    try:
        datasets.load_fashion_mnist(cfg.train, "train", False)
        return cfg.train
    except DataError:
        pass
    apt_failed = ""
    if cfg.train == DEBIAN_FOLDER and shutil.which("apt-get") and os.geteuid() == 0:
        try:
            apt_install(DEBIAN_PACKAGE)
            datasets.load_fashion_mnist.cache_clear()
            return f"Debian's {DEBIAN_PACKAGE}"
        except DataError as e:
            apt_failed = f"{e}; "
    if cfg.download:
        log.info("data: downloading Fashion-MNIST with torchvision into %s", datasets.CACHE)
        try:
            datasets.load_fashion_mnist(cfg.train, "train", True)
            return f"torchvision's download in {datasets.CACHE}"
        except DataError:
            pass
    fix = "" if apt_failed else f"; on Debian/Ubuntu: sudo apt-get install {DEBIAN_PACKAGE}"
    raise DataError(f"Fashion-MNIST: {apt_failed}not in {cfg.train} and "
                    f"{'the download failed' if cfg.download else 'data.download=false'}{fix}")


def main(cfg: Config) -> dict[str, Any]:
    """Fetch (Fashion-MNIST) or check the data; index both splits and print what was found."""
    where = fetch_fashion_mnist(cfg.data) if cfg.data.source == "fashion-mnist" else cfg.data.train
    train = datasets.index_split(cfg.data, "train")
    test = datasets.index_split(cfg.data, "test")
    summary = {"source": cfg.data.source, "from": where, "classes": list(train.classes),
               "train_images": len(train.items), "test_images": len(test.items)}
    print(f"data: {cfg.data.source} ready ({where}): {len(train.classes)} classes, "
          f"{len(train.items)} train and {len(test.items)} test images")
    return summary
