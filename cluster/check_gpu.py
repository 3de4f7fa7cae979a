"""Run before `ray start` on a node: if the node has NVIDIA GPUs, torch must be able to use them.

A driver older than the CUDA build of torch makes ``torch.cuda.is_available()`` false with only a
warning: the node would join the cluster, take GPU work, and fail in the first CUDA or NCCL call
(or run it on the CPU). This refuses to start the node instead, naming both versions.

    python cluster/check_gpu.py      # exit 0: no NVIDIA GPU, or torch runs on it; 1: it cannot
"""

from __future__ import annotations

import shutil
import subprocess
import sys


def driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None on a node without one."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return f"unknown (nvidia-smi failed: {out.stderr.strip()[:200]})"
    return out.stdout.split()[0] if out.stdout.strip() else None


def main() -> int:
    """Print what was found; 1 if the node has a GPU that torch cannot use."""
    driver = driver_version()
    if driver is None:
        print("check_gpu: no NVIDIA GPU on this node")
        return 0
    import torch

    problem = None
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            problem = "torch sees no usable GPU"
        else:
            (torch.ones(8, device="cuda") * 2).sum().item()  # a real kernel launch
    except Exception as e:  # CUDA errors come as RuntimeError and friends
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if problem:
        print(f"check_gpu: NVIDIA driver {driver} cannot run torch {torch.__version__} (built for CUDA "
              f"{torch.version.cuda}): {problem}. Use a host image whose driver supports CUDA {torch.version.cuda} "
              "(cluster/aws.yaml, cluster/gcp.yaml) or rebuild cluster/Dockerfile with --build-arg TORCH_CUDA=<cuXYZ> "
              "for this driver", file=sys.stderr)
        return 1
    print(f"check_gpu: {torch.cuda.device_count()} GPU(s), driver {driver}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
