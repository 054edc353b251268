"""Loading as the published repositories are laid out: a standalone VAE repository resolved from a hub cache (offline,
the way a hub id resolves), and checkpoints stored in another dtype than the run's."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from .jobutil import ROOT, job_env


def hub_cache_repo(hf_home, repo_id: str, files_from: str, rev: str = "0" * 40) -> str:
    """Lay out `files_from` as the cached snapshot of `repo_id` under HF_HOME (hub/models--org--name/...)."""
    import shutil

    base = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = base / "snapshots" / rev
    shutil.copytree(files_from, snapshot)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    return str(snapshot)


@pytest.mark.heavy
def test_a_standalone_vae_hub_id_resolves_from_the_hub_cache(tmp_path, tiny_ad_dir):
    """`--vae stabilityai/sd-vae-ft-mse`-style: config and weights at the repository root (not under vae/)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_ad_dir, "base"), subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # a different VAE, so the video shows which one decoded it
    vae.save_pretrained(tmp_path / "standalone")
    hf_home = tmp_path / "hf"
    hub_cache_repo(hf_home, "someorg/sd-vae-standalone", tmp_path / "standalone")
    env = job_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    common = [sys.executable, "-m", "pipelines.sample", "--model-dir", tiny_ad_dir, "--prompt", "a cat", "--steps", "2",
              "--frames", "2", "--height", "64", "--width", "64", "-q"]
    r = subprocess.run([*common, "--vae", "someorg/sd-vae-standalone", "--out", str(tmp_path / "with.mp4")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([*common, "--out", str(tmp_path / "without.mp4")], capture_output=True, text=True, env=env,
                       cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from pipelines.video import read_mp4

    a, b = read_mp4(str(tmp_path / "with.mp4"))[0], read_mp4(str(tmp_path / "without.mp4"))[0]
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() > 20  # the cached VAE decoded it
    # a pipeline hub id as --vae still reads its vae/ subfolder
    hub_cache_repo(hf_home, "someorg/a-pipeline", os.path.join(tiny_ad_dir, "base"))
    r = subprocess.run([*common, "--vae", "someorg/a-pipeline", "--out", str(tmp_path / "pipe.mp4")],
                       capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.array_equal(read_mp4(str(tmp_path / "pipe.mp4"))[0], b)  # the same VAE as the base's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_scorer_runs_in_the_run_dtype_whatever_the_checkpoint_stores(tmp_path, dtype):
    from transformers import CLIPModel

    from operators.scoring import ClipScorer
    from pipelines.fixtures.models import build_clip

    folder = build_clip(str(tmp_path / "clip"))
    CLIPModel.from_pretrained(folder).half().save_pretrained(folder)  # a float16 checkpoint, as many are published
    scorer = ClipScorer(folder, "cpu", dtype)
    assert {p.dtype for p in scorer.model.parameters()} == {dtype}
    got = scorer.score(torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(0)), "a cat")
    assert all(np.isfinite(v) for v in got.values())


@pytest.mark.heavy
def test_image_model_as_a_bare_unet_folder(tiny_ad_dir, ad_backbone):
    """docs/sample.md "Flags": --image-model may be a UNet folder on its own. With the legacy AnimateDiff preset (the
    IDM reads the VDM's text embeddings) it samples exactly as the full image-model pipeline with the same UNet."""
    import os

    import torch

    from pipelines.backbones.registry import load_backbone
    from pipelines.config import ModelSpec, resolve_params
    from pipelines.generate import generate

    spec = ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", dtype="float32")
    bare = load_backbone(ModelSpec(**{**spec.__dict__,
                                      "image_model": os.path.join(tiny_ad_dir, "image_model", "unet")}))
    assert bare.image_text_encoder is None
    p = resolve_params(dict(prompt="a kite", sampler="ivmixed_ad_v1", steps=3, frames=2, height=64, width=64))
    assert torch.equal(generate(bare, [p], decode=False)[0].latents,
                       generate(ad_backbone, [p], decode=False)[0].latents)
