"""Data benchmark: Ray Data encoding vs a plain loop, and S3 vs local latent streaming.

    python benchmarks/data.py [--quick]     ->  benchmarks/results/data.json (quick: data.quick.json)

What is measured, all in one process and one run, on the same images and the same models:

``encode_ray_over_loop`` (throughput ratio, higher is better)
    Images per second of the real encode stage, ``mmdist.encode.main`` (a Ray Data actor pool of
    2 ``ShardEncoder`` actors, 1 torch thread each, shards of 128 images), divided by the images
    per second of the *best* plain single-process loop over the same ImageFolder with the same
    encoder (``LatentEncoder`` + ``datasets.load_item``, batches of ``encode.batch_size``), run
    once with 1 and once with 2 torch threads. Both timings cover indexing the folder, loading
    the encoder, reading/decoding/cropping every image and encoding it; the Ray side also pays
    for starting its actor processes (imports + encoder load in each) and writing the Parquet
    shards and manifest, the loop writes nothing. ``ray.init`` is timed separately
    (``ray_start_seconds``) and excluded. Data: an ImageFolder of RGB PNGs (4 classes, 64 px,
    smooth random content) generated here; encoder: a randomly initialised diffusers
    AutoencoderKL (3 levels, 32/64/128 channels, 4 latent channels, 16x16 latents) saved with
    ``save_pretrained`` so encoding is compute-bound as with the SD VAE.
    Reported beside it, not the key: ``encode.ray_over_loop_steady``, the Ray throughput after
    each actor's first shard (from the shard files' modification times: a shard is written
    whole when done) over the best loop's throughput without its set-up; it leaves out the
    actors' start-up, which a small data set over-weights.

``encode_pipelined_over_serial`` (throughput ratio, higher is better)
    ``mmdist.encode.main`` with ``encode.pipeline=on`` (Ray Data tasks read and decode a shard,
    the 2 actors only encode it, tasks write it: the stages overlap) over ``off`` (each actor
    reads, decodes, encodes and writes its shard). Same images, encoder, shards, pool size and
    CPUs per actor; run off, on, on, off (ABBA) and pooled. On a CPU-only machine the encoder and
    the decoding share the same cores; the pipeline is for a GPU encoder fed by CPU decoding and
    object storage (``encode.pipeline=auto`` turns it on only there). ``encode_ray_over_loop``
    uses the first ``off`` run, the CPU default.

``s3_over_local`` (throughput ratio, higher is better; 1.0 means S3 costs nothing)
    End-to-end fine-tuning steps per second (``steps_per_second`` of the returned manifest's
    ``history``: it includes Ray Data batch fetching) of ``mmdist.finetune.main`` with the latent
    shards read from the loopback S3 endpoint (a moto server in this process), divided by the
    same with the shards read from local disk. The shards are encoded once, locally, with
    ``mmdist.encode.main`` and uploaded byte for byte: the default job's data, Fashion-MNIST in
    pixel space (full mode: all 60,000 training images, 28x28x1, 4,096 rows = 12.8 MB per
    shard; quick mode: 1,000 images in shards of 250), so the
    run streams through files as a real one does instead of restarting a tiny epoch every few
    steps. The fine-tune config (1 Ray Train worker, a random-init DiT of the ``fashion-mnist``
    size, learned sigma, batch 64, the default DiffFit + minimax section) is identical. The
    first log window (warm-up: first file listing and reads) of each run is left out; the full
    mode runs local, S3, S3, local (ABBA, so a linear drift in the machine's load cancels) and
    pools the two runs of each. ``step_seconds`` (time inside ``train_step`` only) is reported
    too: it should not depend on where the data comes from.

Machine facts (CPU count, versions, date, /proc/loadavg at start and end, the CPU share other
processes used just before the run, the busiest other processes) are recorded under
``machine``; ``loadavg`` is also recorded before each measurement. A loopback moto server is a
Python process on the same 2 cores, not a real S3 endpoint: the S3 figure is the cost of the
object-storage code path on this machine, not of a network.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets RAY_AUTH_MODE and sys.path before Ray or mmdist load)

FMNIST = "/usr/share/datasets/fashion-mnist"
FULL = dict(classes=4, per_class=384, image_size=64, shard_rows=128, batch_size=64,
            ft_per_class=None, ft_shard_rows=4096, ft_steps=100, ft_log_every=20, ft_batch=64, rounds=2)
QUICK = dict(classes=4, per_class=48, image_size=64, shard_rows=48, batch_size=48,
             ft_per_class=100, ft_shard_rows=250, ft_steps=30, ft_log_every=10, ft_batch=32, rounds=1)
BUCKET = "mmdist-bench"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> object:
    """A moto S3 server on 127.0.0.1; the AWS variables are set here, before Ray starts."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    os.environ.update({
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    import s3fs

    s3fs.S3FileSystem().mkdir(BUCKET)
    return server


# ----------------------------------------------------------------------------------------------
# Inputs: an ImageFolder and a random VAE
# ----------------------------------------------------------------------------------------------


def make_images(root: str, classes: int, per_class: int, size: int, seed: int = 0) -> str:
    """root/class<k>/<i>.png: smooth random RGB images (bicubic 8x8 upsampling + mild noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            arr = np.asarray(low.resize((size, size), Image.BICUBIC)).astype(np.int16)
            arr = (arr + rng.integers(-8, 9, arr.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(folder, f"{i:05d}.png"))
    return root


def make_vae(folder: str, seed: int = 0) -> str:
    """A random AutoencoderKL (factor-4 downsampling, 4 latent channels) saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL  # mmdist has load_vae but no factory for a fresh VAE

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 128),
                        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def make_backbone(folder: str, latent_shape: list[int], classes: int, seed: int = 0) -> str:
    """A random ``fashion-mnist``-size DiT (learned sigma) for the latents, saved with save_dit."""
    import torch

    from mmdist.models.diffusion import create_dit, save_dit

    torch.manual_seed(seed)
    c, h, _ = latent_shape
    save_dit(create_dit("fashion-mnist", sample_size=h, in_channels=c, num_classes=classes), folder)
    return folder


def base_config(tmp: str, images: str, vae: str, p: dict) -> object:
    """The encode benchmark's config (outputs are set per measurement)."""
    from mmdist.config import Config, DataConfig, EncodeConfig, absolute_paths

    return absolute_paths(Config(
        name="bench-data", output=os.path.join(tmp, "unused"),
        data=DataConfig(source="imagefolder", train=images, channels=3, image_size=p["image_size"]),
        encode=EncodeConfig(encoder=vae, shard_rows=p["shard_rows"], batch_size=p["batch_size"],
                            num_actors=2),
    ))


def finetune_config(tmp: str, p: dict) -> object:
    """The S3 benchmark's config: Fashion-MNIST in pixel space, encoded into tmp/fm-latents."""
    from mmdist.config import Config, DataConfig, EncodeConfig, absolute_paths

    base = Config()
    ft = dataclasses.replace(base.finetune, steps=p["ft_steps"], log_every=p["ft_log_every"],
                             checkpoint_every=p["ft_steps"], global_batch_size=p["ft_batch"], num_workers=1)
    return absolute_paths(dataclasses.replace(
        base, name="bench-data-s3", output=os.path.join(tmp, "unused"),
        latents=os.path.join(tmp, "fm-latents"), preview_every=0,  # what is timed is streaming only
        data=DataConfig(train=FMNIST, max_per_class=p["ft_per_class"], download=False),
        encode=EncodeConfig(shard_rows=p["ft_shard_rows"]), finetune=ft))


# ----------------------------------------------------------------------------------------------
# Encode: plain loop vs Ray Data actor pool
# ----------------------------------------------------------------------------------------------


def encode_loop(cfg: object, threads: int) -> dict:
    """Index, load the encoder and encode every image in one process with ``threads`` torch threads."""
    import numpy as np
    import torch

    from mmdist import datasets
    from mmdist.models.diffusion import LatentEncoder

    common.set_torch_threads(threads)
    load = common.loadavg()
    start = time.perf_counter()
    split = datasets.index_split(cfg.data, "train")
    encoder = LatentEncoder(cfg.encode.encoder, cfg.encode.encoder_subfolder, cfg.encode.scaling_factor,
                            "cpu")
    setup = time.perf_counter() - start
    n, bs = 0, cfg.encode.batch_size
    for first in range(0, len(split.items), bs):
        chunk = [datasets.load_item(cfg.data, it).transpose(2, 0, 1) for it in split.items[first: first + bs]]
        mean, std = encoder.encode(torch.from_numpy(np.stack(chunk)))
        mean.float().numpy(), std.float().numpy()
        n += len(chunk)
    total = time.perf_counter() - start
    common.set_torch_threads(1)
    return {"threads": threads, "images": n, "seconds": total, "setup_seconds": setup,
            "images_per_second": n / total, "images_per_second_excl_setup": n / (total - setup),
            "loadavg_before": load}


def encode_ray(cfg: object, output: str) -> dict:
    """The real encode stage (2 actors) into ``output``; returns its timing and manifest."""
    from mmdist import encode

    cfg = dataclasses.replace(cfg, output=output)
    load = common.loadavg()
    wall_start, start = time.time(), time.perf_counter()
    manifest = encode.main(cfg)
    seconds = time.perf_counter() - start
    folder = os.path.join(output, "latents")
    # Each shard is written whole when its actor finishes it, so the files' modification times
    # are completion times: the span after each actor's first shard is encoding without the
    # actors' start-up (process, imports, encoder load).
    done = sorted(os.path.getmtime(os.path.join(folder, s)) for s in manifest["shards"])
    actors = min(cfg.encode.num_actors, len(done))
    steady_images = manifest["rows"] - actors * cfg.encode.shard_rows
    steady_span = done[-1] - done[actors - 1]
    steady = steady_images / steady_span if steady_span > 0 and steady_images > 0 else None
    return {"actors": actors, "images": manifest["rows"], "seconds": seconds,
            "manifest_wall_seconds": manifest["wall_seconds"], "shards": len(manifest["shards"]),
            "images_per_second": manifest["rows"] / seconds, "loadavg_before": load,
            "first_shard_done_seconds": done[0] - wall_start,
            "steady_images": steady_images, "steady_seconds": steady_span,
            "steady_images_per_second": steady,
            "folder": folder, "manifest": manifest}


# ----------------------------------------------------------------------------------------------
# Fine-tune: latents on S3 vs local disk
# ----------------------------------------------------------------------------------------------


def upload(local: str, uri: str) -> int:
    """Copy a local folder tree to object storage, file by file; returns the bytes copied."""
    from mmdist import storage

    total = 0
    for dirpath, _, files in os.walk(local):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            storage.write_bytes(storage.join(uri, os.path.relpath(path, local).replace(os.sep, "/")), data)
            total += len(data)
    return total


def finetune_run(cfg: object, latents: str, output: str, backbone: str) -> dict:
    """``mmdist.finetune.main`` on the given latents; returns the history aggregated past window 1."""
    ft = dataclasses.replace(cfg.finetune, backbone=backbone)
    _, out = common.timed_finetune(dataclasses.replace(cfg, output=output, latents=latents, finetune=ft))
    return {**out, "latents": latents}


def pool_runs(runs: list[dict]) -> dict:
    """Pool several runs' measured windows: total steps / total seconds."""
    steps = sum(r["steps_measured"] for r in runs)
    wall = sum(r["steps_measured"] * r["seconds_per_step_end_to_end"] for r in runs)
    return {"steps_per_second": steps / wall,
            "step_seconds": sum(r["steps_measured"] * r["step_seconds"] for r in runs) / steps,
            "steps_measured": steps}


def main() -> None:
    """Build the inputs, run every measurement, print and write the figures."""
    args = common.parse_args(__doc__, "data")
    p = QUICK if args.quick else FULL
    facts = common.machine_facts()
    common.set_torch_threads(1)
    tmp = common.scratch("data")
    server = start_s3()  # before Ray: the workers inherit the AWS_* variables
    try:
        images = make_images(os.path.join(tmp, "images"), p["classes"], p["per_class"], p["image_size"])
        vae = make_vae(os.path.join(tmp, "vae"))
        cfg = base_config(tmp, images, vae, p)
        ray_start = common.start_ray(num_cpus=2)

        common.log.info("encode: plain loop, 1 and 2 torch threads")
        loops = [encode_loop(cfg, 1), encode_loop(cfg, 2)]
        common.log.info("encode: mmdist.encode.main with 2 actors, encode.pipeline off, on, on, off (ABBA)")
        runs = {"off": [], "on": []}
        for i, mode in enumerate(("off", "on", "on", "off")):
            piped_cfg = dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, pipeline=mode))
            runs[mode].append(encode_ray(piped_cfg, os.path.join(tmp, f"encoded-{i}-{mode}")))
        ray_enc = runs["off"][0]  # the CPU default (encode.pipeline=auto is off without GPUs)
        best = max(loops, key=lambda r: r["images_per_second"])
        piped_ips = sum(r["images"] for r in runs["on"]) / sum(r["seconds"] for r in runs["on"])
        serial_ips = sum(r["images"] for r in runs["off"]) / sum(r["seconds"] for r in runs["off"])
        serial, piped = runs["off"][1:], runs["on"]
        for r in serial + piped:
            r.pop("folder"), r.pop("manifest")

        ray_enc.pop("folder")
        vae_manifest = ray_enc.pop("manifest")

        common.log.info("finetune: encode Fashion-MNIST locally, upload the shards to S3")
        from mmdist import encode

        ft_cfg = finetune_config(tmp, p)
        manifest = encode.main(ft_cfg)
        latents = ft_cfg.latents
        uploaded = upload(latents, f"s3://{BUCKET}/latents")
        backbone = make_backbone(os.path.join(tmp, "backbone"), manifest["latent_shape"],
                                 len(manifest["classes"]))
        order = ["local", "s3", "s3", "local"] if p["rounds"] == 2 else ["local", "s3"]
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        for i, where in enumerate(order):
            common.log.info("finetune %d/%d: latents on %s", i + 1, len(order), where)
            source = latents if where == "local" else f"s3://{BUCKET}/latents"
            output = os.path.join(tmp, f"ft-{i}-{where}")
            runs[where].append(finetune_run(ft_cfg, source, output, backbone))
        local, s3 = pool_runs(runs["local"]), pool_runs(runs["s3"])
    finally:
        common.stop_ray()
        server.stop()
        common.cleanup(tmp, args.keep)

    result = {
        "encode_ray_over_loop": common.ratio(ray_enc["images_per_second"], best["images_per_second"]),
        "encode_pipelined_over_serial": common.ratio(piped_ips, serial_ips),
        "s3_over_local": common.ratio(s3["steps_per_second"], local["steps_per_second"]),
        "quick": args.quick,
        "encode": {
            "ray": ray_enc, "loop_1_thread": loops[0], "loop_2_threads": loops[1],
            "best_loop_threads": best["threads"],
            "ray_over_loop_1_thread": common.ratio(ray_enc["images_per_second"],
                                                   loops[0]["images_per_second"]),
            "ray_over_loop_2_threads": common.ratio(ray_enc["images_per_second"],
                                                    loops[1]["images_per_second"]),
            "ray_over_loop_steady": common.ratio(ray_enc["steady_images_per_second"],
                                                 max(r["images_per_second_excl_setup"] for r in loops)),
            "ray_start_seconds": ray_start,
            "pipelined_runs": piped, "serial_runs": [ray_enc["seconds"], *serial],
            "pipelined_images_per_second": piped_ips, "serial_images_per_second": serial_ips,
        },
        "finetune_s3": {
            "local": local, "s3": s3, "runs": runs, "order": order, "bytes_uploaded": uploaded,
            "rows": manifest["rows"], "shards": len(manifest["shards"]),
            "latent_shape": manifest["latent_shape"],
            "steps_per_epoch": manifest["rows"] // p["ft_batch"],
            "s3_over_local_step_seconds": common.ratio(local["step_seconds"], s3["step_seconds"]),
        },
        "sizes": {**p, "images": p["classes"] * p["per_class"], "latent_shape": vae_manifest["latent_shape"],
                  "encoder": "random AutoencoderKL (32, 64, 128) ch, 4 latent ch",
                  "s3_data": "Fashion-MNIST train split, pixel space (identity encoder)",
                  "dit": "fashion-mnist size (6 layers, 4 heads x 32, patch 4), learned sigma"},
        "machine": common.finish_facts(facts),
    }
    common.write_json(args.out, common.rnd(result))
    print(f"machine: {facts['cpu_count']} CPUs, loadavg {facts['loadavg_start']} -> {facts['loadavg_end']}, "
          f"others busy {facts['cpu_busy_fraction_start']:.0%} at start")
    print(f"ray start-up: {ray_start:.1f} s (excluded)")
    for r in loops:
        print(f"encode loop, {r['threads']} thread(s): {r['images_per_second']:.1f} img/s "
              f"({r['images']} images, {r['seconds']:.1f} s, setup {r['setup_seconds']:.1f} s)")
    print(f"encode mmdist.encode.main, 2 actors: {ray_enc['images_per_second']:.1f} img/s "
          f"({ray_enc['seconds']:.1f} s; after each actor's first shard: "
          f"{ray_enc['steady_images_per_second'] or float('nan'):.1f} img/s)")
    print(f"encode_ray_over_loop = {result['encode_ray_over_loop']:.3f}  "
          f"(vs the {best['threads']}-thread loop; "
          f"steady: {result['encode']['ray_over_loop_steady'] or float('nan'):.3f})")
    print(f"encode pipelined (decode tasks -> encoder actors -> write tasks): {piped_ips:.1f} img/s; "
          f"serial actors (read, decode, encode, write in each): {serial_ips:.1f} img/s; "
          f"encode_pipelined_over_serial = {result['encode_pipelined_over_serial']:.3f}")
    for name, r in (("local", local), ("s3   ", s3)):
        print(f"finetune {name}: {r['steps_per_second']:.2f} steps/s "
              f"(train_step {r['step_seconds'] * 1e3:.1f} ms)")
    print(f"s3_over_local = {result['s3_over_local']:.3f}")


if __name__ == "__main__":
    main()
