"""Real sizes and real layouts: the decode chunk, models read straight into the run dtype, `.bin`-only folders, and
(slow) every backbone and BIVDiff VDM sampled from full-size random models in the published layouts. The GPU check's
code path: tests/test_device_wheels.py."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_chunk_changes_memory_not_frames(ad_backbone):
    z = torch.randn(1, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    ad_backbone.decode_chunk = 5
    whole = ad_backbone.decode(z)
    ad_backbone.decode_chunk = 2  # 2 + 2 + 1 frames
    try:
        chunked = ad_backbone.decode(z)
    finally:
        ad_backbone.decode_chunk = 16
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_decode_chunk_is_validated_and_not_part_of_the_fingerprint():
    from pipelines.config import ModelSpec

    with pytest.raises(ValueError, match="decode_chunk: must be an integer >= 1"):
        ModelSpec(decode_chunk=0)
    assert ModelSpec(decode_chunk=1).fingerprint() == ModelSpec(decode_chunk=8).fingerprint()


@pytest.mark.heavy
def test_models_load_in_the_run_dtype_without_a_cast(tiny_ad_dir, caplog):
    """bfloat16 straight from from_pretrained (no float32 copy, no diffusers 'set torch_dtype' cast warning); the VAE
    stays float32 (every backbone decodes in float32)."""
    from pipelines.backbones.registry import load_backbone
    from pipelines.config import ModelSpec

    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        bb = load_backbone(ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", dtype="bfloat16"))
    text = caplog.text + " ".join(str(w.message) for w in caught)
    assert "torch_dtype" not in text and "kept in float32" not in text
    for m in (bb.unet, bb.image_unet, bb.text_encoder, bb.image_text_encoder):
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bb.vae.parameters()} == {torch.float32}


@pytest.mark.heavy
def test_videocrafter2_decodes_in_float32(tmp_path):
    from pipelines.backbones.registry import load_backbone
    from pipelines.config import ModelSpec
    from pipelines.fixtures.models import build_videocrafter2

    folder = build_videocrafter2(str(tmp_path / "vc2"))
    bb = load_backbone(ModelSpec.from_model_dir("videocrafter2", folder, device="cpu", dtype="bfloat16"))
    assert {p.dtype for p in bb.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in bb.unet.parameters()} == {torch.bfloat16}


@pytest.mark.heavy
def test_bin_only_folders_load(tiny_ad_dir, tmp_path):
    """A pipeline whose weights are pickled .bin only (zeroscope, RV6.0's UNet, inpainting) loads like safetensors."""
    import shutil

    from pipelines.backbones.registry import load_backbone
    from pipelines.config import ModelSpec
    from pipelines.fixtures.models import add_bin_copies

    folder = str(tmp_path / "ad")
    shutil.copytree(tiny_ad_dir, folder)
    add_bin_copies(folder)
    from safetensors.torch import load_file

    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".safetensors"):
                if name == "model.safetensors":  # transformers' text encoders: write their .bin too
                    torch.save(load_file(os.path.join(root, name)), os.path.join(root, "pytorch_model.bin"))
                os.remove(os.path.join(root, name))
    assert not [f for _, _, fs in os.walk(folder) for f in fs if f.endswith(".safetensors")]
    a = load_backbone(ModelSpec.from_model_dir("animatediff", folder, device="cpu", dtype="float32"))
    b = load_backbone(ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", dtype="float32"))
    for m, n in ((a.unet, b.unet), (a.image_unet, b.image_unet), (a.text_encoder, b.text_encoder), (a.vae, b.vae)):
        for (k, p), (_, q) in zip(m.state_dict().items(), n.state_dict().items()):
            assert torch.equal(p, q), k


# -- slow: full-size random models in the published layouts ---------------------------------------------------------

SMALL = ["--steps", "2", "--frames", "2", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "bfloat16",
         "-q"]


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    root = os.environ.get("IVMIX_FULL_SIZE_DIR") or str(tmp_path_factory.mktemp("fullsize"))

    def get(kind: str) -> str:
        folder = os.path.join(root, kind)
        if not os.path.isfile(os.path.join(folder, "tiny.json")):
            subprocess.run([sys.executable, "-m", "pipelines.fixtures.tiny", kind, folder, "--full-size"], cwd=ROOT,
                           check=True)
        return folder

    return get


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["animatediff", "modelscope", "videocrafter2"])
def test_full_size_backbone_samples(full_size, backbone, tmp_path):
    folder = full_size(backbone)
    out = tmp_path / "v.mp4"
    extra = ["--vae", os.path.join(folder, "vae")] if backbone == "animatediff" else []  # root-level standalone VAE
    proc = _cli("pipelines.sample", "--backbone", backbone, "--model-dir", folder, "--prompt", "a fox", "--out",
                str(out),
                *extra, *SMALL)
    assert out.stat().st_size > 0 and "wrote" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("vdm", ["zeroscope", "modelscope", "videocrafter2", "animatediff"])
def test_full_size_bivdiff_vdm_samples(full_size, vdm, tmp_path):
    import numpy as np

    folder = full_size("bivdiff")
    src = tmp_path / "src.npy"
    np.save(src, np.random.default_rng(0).random((8, 64, 64, 3), dtype=np.float32))  # frames 0 and 4 are used
    if vdm in ("zeroscope", "modelscope"):
        models = ["--model-dir", folder, "--vdm", vdm]
    else:
        other = full_size(vdm)
        models = ["--vdm", vdm, "--image-model", os.path.join(folder, "image_model"), "--controlnet",
                  os.path.join(folder, "controlnet"),
                  *(["--video-model", os.path.join(other, "base"), "--video-unet", os.path.join(other, "unet")]
                    if vdm == "videocrafter2" else
                    ["--video-model", os.path.join(other, "base"), "--motion-adapter",
                     os.path.join(other, "motion_adapter")])]
    out = tmp_path / "b.mp4"
    _cli("pipelines.bivdiff", "--task", "controlnet-canny", "--video", str(src), "--prompt", "a fox",
         "--out", str(out), *models, "--idm-steps", "2", *SMALL)
    assert out.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("task", ["instruct-pix2pix", "inpaint"])
def test_full_size_bivdiff_task_models_load_and_run(full_size, task, tmp_path):
    """The InstructPix2Pix (Euler ancestral scheduler) and inpainting (.bin-only UNet, 9 channels) pipelines at full
    size."""
    import numpy as np

    folder = full_size("bivdiff")
    rng = np.random.default_rng(0)
    src, mask = tmp_path / "src.npy", tmp_path / "mask.npy"
    np.save(src, rng.random((8, 64, 64, 3), dtype=np.float32))
    np.save(mask, (rng.random((8, 64, 64, 3)) > 0.5).astype(np.float32))
    out = tmp_path / "t.mp4"
    _cli("pipelines.bivdiff", "--task", task, "--video", str(src), "--prompt", "a fox", "--out", str(out),
         "--model-dir", folder, *(["--mask-video", str(mask)] if task == "inpaint" else []), "--idm-steps", "2", *SMALL)
    assert out.stat().st_size > 0
