"""A Ray Train worker for the 2-worker equivalence test (importable by workers via PYTHONPATH)."""

import os
import tempfile

import torch


def batches(steps, global_batch, classes, dim, seed=0):
    """The same global batches on every rank and in the single process."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, classes, (global_batch,), generator=g), torch.randn(global_batch, dim, generator=g),
             torch.randn(global_batch, dim, generator=g)) for _ in range(steps)]


def minimax_worker(config):
    """Each rank takes its slice of every global batch; terms, averaged grads and memories are reported."""
    import ray.train
    import torch.distributed as dist
    from safetensors.torch import save_file

    from mmdist.distributed import TorchCollective
    from mmdist.models.minimax import MinimaxObjective

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchCollective()
    obj = MinimaxObjective(config["classes"], config["dim"], memory_size=config["memory"], lambda_rep=0.5,
                           lambda_div=0.5, center=None)
    local = config["global_batch"] // world
    values, grads = [], []
    for labels, pred, real in batches(config["steps"], config["global_batch"], config["classes"], config["dim"]):
        sl = slice(rank * local, (rank + 1) * local)
        p = pred[sl].clone().requires_grad_()
        out = obj(p, real[sl], labels[sl], comm)
        out.loss.backward()
        grad = comm.all_gather(p.grad) / world  # DDP averages each parameter's gradient over ranks
        values.append(out.loss.item())
        grads.append(grad)
    with tempfile.TemporaryDirectory() as d:
        save_file({"real": obj.real.buffer, "pred": obj.pred.buffer, "grads": torch.stack(grads),
                   "values": torch.tensor(values)}, os.path.join(d, f"rank{rank}.safetensors"))
        ray.train.report({"rank": rank}, checkpoint=ray.train.Checkpoint.from_directory(d))
