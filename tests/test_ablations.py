"""Ablation rows and sampling-time selection through the real stages: paired runs, nested picks."""

import dataclasses
import json
import os
import shutil

from mmdist import finetune, sample


def _run(smoke_run, tmp_path):
    """The smoke run's latents and pretrained backbone, fine-tuned and sampled for three rows."""
    cfg, _ = smoke_run
    root = tmp_path / "ablations"
    for stage in ("latents", "pretrain"):
        shutil.copytree(os.path.join(cfg.output, stage), root / stage, ignore=shutil.ignore_patterns("ray"))
    cfg = dataclasses.replace(
        cfg, output=str(root),
        sample=dataclasses.replace(cfg.sample, ipc=2, batch_size=2, steps=4, baseline=False, oversample=3),
        evaluate=dataclasses.replace(cfg.evaluate, methods=("minimax", "finetune", "minimax+select", "random")))
    return cfg, finetune.main(cfg), sample.main(cfg)


def test_ablation_rows_are_paired_runs_and_select_keeps_the_base_images(smoke_run, tmp_path):
    cfg, tuned, sampled = _run(smoke_run, tmp_path)
    assert set(tuned["variants"]) == {"minimax", "finetune"}
    assert sampled["variants"] == ["finetune", "minimax", "minimax+select"]

    def history(method):
        with open(os.path.join(cfg.output, "finetune", method, "manifest.json")) as f:
            m = json.load(f)
        return m["config"]["finetune"]["minimax"], m["history"]

    mm, mm_hist = history("minimax")
    ft, ft_hist = history("finetune")
    assert (ft["lambda_rep"], ft["lambda_div"]) == (0.0, 0.0) and (mm["lambda_rep"], mm["lambda_div"]) != (0.0, 0.0)
    assert "representativeness" in mm_hist[-1] and "representativeness" not in ft_hist[-1]
    # same seed, same batches, same noise: the first step's diffusion loss is the same number
    assert ft_hist[0]["loss_diffusion"] == mm_hist[0]["loss_diffusion"]

    # +select: the kept images are the facility-location picks among the minimax model's candidates,
    # and candidate k < IPC is image k of the minimax row (same model, same noise)
    import torch

    from mmdist import artifacts
    from mmdist.models.minimax import embed
    from mmdist.models.selection import facility_location

    samples = os.path.join(cfg.output, "samples")
    with open(os.path.join(samples, "minimax+select", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["oversample"] == 3 and manifest["selection"] == "facility_location"
    latents = artifacts.require(os.path.join(cfg.output, "latents"), "encode")
    refs = sample.class_references(cfg, latents, [0, 1])
    model_dir = os.path.join(cfg.output, "finetune", "minimax", "model_ema")
    candidates = sample.ClassSampler(cfg.to_dict(), (model_dir, None), str(tmp_path / "scratch"), latents, 1, "-",
                                     refs["center"])
    for entry in manifest["classes"]:
        with open(os.path.join(samples, "minimax+select", "classes", f"{entry['folder']}.json")) as f:
            marker = json.load(f)
        z = candidates._latents(entry["label"], range(6))
        picked = facility_location(embed(z, torch.from_numpy(refs["center"])),
                                   torch.from_numpy(refs["per_class"][entry["label"]]), 2)
        assert marker["candidates"] == 6 and marker["selected"] == picked
        pngs = [sample.png_bytes(img) for img in candidates.decoder.decode(z).numpy()]

        def image(variant, k):
            with open(os.path.join(samples, variant, "images", entry["folder"], f"{k:05d}.png"), "rb") as f:
                return f.read()

        assert [image("minimax+select", slot) for slot in range(2)] == [pngs[k] for k in picked]
        assert [image("minimax", k) for k in range(2)] == pngs[:2]
