"""Shared fixtures: tiny random models built offline once per session, loaded backbones, the BIVDiff runner and its
source videos, and the servers the integration tests use (one Ray for the session's job runs, moto's S3 server)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import torch

from pipelines.backbones.registry import load_backbone
from pipelines.bivdiff.config import BivdiffSpec
from pipelines.config import ModelSpec
from pipelines.fixtures.tiny import ensure_tiny

from . import jobutil
from .jobutil import BIN, free_port, job_env, own_ports, start_server, stop_server, wait_http

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two test processes on a 2-core machine: a core each
    torch.set_num_threads(1)



# ---- tiny model sets ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> str:
    """The session's tiny model sets, one folder per kind: also the `tiny_cache` of the jobs the tests run (a job
    finds the sets built here and builds what it misses, e.g. `clip`, beside them)."""
    return str(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_root):
    """kind -> the folder of its tiny set (`python -m pipelines.fixtures.tiny KIND DIR`, seed 0), built on first use
    and then shared by every test of the session (tests copy a set before changing it)."""
    return lambda kind: ensure_tiny(kind, os.path.join(tiny_root, kind))


@pytest.fixture(scope="session")
def tiny_ad_dir(tiny_model) -> str:
    return tiny_model("animatediff")


@pytest.fixture(scope="session")
def tiny_cache(tiny_ad_dir) -> str:
    """The folder of the session's tiny sets: a job config's `tiny_cache` (tests/jobutil.py `tiny_config`)."""
    return os.path.dirname(tiny_ad_dir)


@pytest.fixture(scope="session")
def ad_backbone(tiny_ad_dir):
    return load_backbone(ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def ad_pipe(tiny_ad_dir):
    """diffusers' own AnimateDiffPipeline over the tiny AnimateDiff set, with the DDIM grid of the AnimateDiff code
    (the golden reference of `standard` and of the comparators built on it). A test that enables an option on it
    (FreeU, FreeInit) disables it again."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    adapter = MotionAdapter.from_pretrained(os.path.join(tiny_ad_dir, "motion_adapter"))
    pipe = AnimateDiffPipeline.from_pretrained(os.path.join(tiny_ad_dir, "base"), motion_adapter=adapter)
    pipe.scheduler = DDIMScheduler.from_pretrained(os.path.join(tiny_ad_dir, "base"), subfolder="scheduler",
                                                   timestep_spacing="linspace", steps_offset=1, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def small():
    """Small sizes for tiny-model runs (fast on 2 CPU cores)."""
    return dict(steps=6, frames=8, height=64, width=64)


def rel(a, b) -> float:
    """Relative L2 error of a against the reference b."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_backbone_fixtures(backbone: str, folder_name: str):
    """(folder fixture, loaded-backbone fixture) for the session's tiny set of `backbone`, loaded once per test
    module; assign the first to a module global called `folder_name`."""

    @pytest.fixture(scope="module")
    def folder(tiny_model):
        return tiny_model(backbone)

    @pytest.fixture(scope="module")
    def loaded(request):
        path = request.getfixturevalue(folder_name)
        return load_backbone(ModelSpec.from_model_dir(backbone, path, device="cpu", dtype="float32"))

    return folder, loaded


# ---- BIVDiff: the tiny set, its runner, source videos --------------------------------------------------------------
BIVDIFF_SMALL = dict(frames=4, height=64, width=64, steps=5, idm_steps=2)
TASK_ROWS = {
    "controlnet-canny": {"prompt": "a robot dancing"},
    "controlnet-depth": {"prompt": "a robot dancing"},  # the source video stands in for its depth maps
    "controlnet-pose": {"prompt": "a robot dancing", "condition_video": "{source}"},
    "t2i-adapter-canny": {"prompt": "a robot dancing"},
    "t2i-adapter-depth": {"prompt": "a robot dancing", "condition_video": "{source}"},
    "p2p": {"idm_prompt": "a square on a wall", "vdm_prompt": "a square on a wall at night", "local_blend": "square"},
    "instruct-pix2pix": {"idm_prompt": "make it snowy", "vdm_prompt": "a snowy street"},
    "inpaint": {"mask_video": "{mask}"},
    "outpaint-horizontal": {},
    "outpaint-vertical": {"alpha": 0.5},
    "external": {"source_video": "{pngs}", "vdm_prompt": "a square"},
}


def synthetic_frames(n: int = 16, h: int = 48, w: int = 80, shift: int = 0) -> np.ndarray:
    """A square moving right over a colour gradient: (n, h, w, 3) floats in [0, 1]."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w, 3), np.float32)
    for i in range(n):
        out[i, ..., 0], out[i, ..., 1], out[i, ..., 2] = xx / w, yy / h, 0.3
        x0 = 4 + 3 * i + shift
        out[i, 12:32, x0 : x0 + 18] = (1.0, 0.9, 0.2)
    return out


def task_row(task: str, videos: dict, **extra) -> dict:
    """A BIVDiff manifest row of `task` at the small sizes, its `{source}`-style paths filled from `videos`."""
    row = {"task": task, "source_video": "{source}", **TASK_ROWS[task], **BIVDIFF_SMALL, **extra}
    return {k: v.format(**videos) if isinstance(v, str) and v.startswith("{") else v for k, v in row.items()}


def quiet(pipe):
    """A diffusers pipeline without its progress bar."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_bivdiff(tiny_model) -> str:
    return tiny_model("bivdiff")


@pytest.fixture(scope="session")
def worker(tiny_bivdiff):
    """BIVDiff's runner on the tiny set (ZeroScope-architecture VDM), float32 on the CPU. Tests that change one of its
    settings (e.g. `stage1.batch`) set it back."""
    from pipelines.bivdiff.runner import BIVDiff

    return BIVDiff(BivdiffSpec.from_model_dir(tiny_bivdiff, device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict:
    """Source, mask, too-short and wide-mask videos, a PNG folder, a pre-edited .npy and a broken file, by name."""
    from PIL import Image

    from pipelines.video import write_mp4

    d = tmp_path_factory.mktemp("videos")
    paths = {k: str(d / f"{k}.mp4") for k in ("source", "mask", "short", "wide_mask")}
    write_mp4(synthetic_frames(), paths["source"], 8)
    mask = np.zeros((16, 48, 80, 3), np.float32)
    mask[:, 10:40, 20:60] = 1.0
    write_mp4(mask, paths["mask"], 8)
    write_mp4(synthetic_frames(n=6), paths["short"], 8)
    write_mp4(np.zeros((16, 48, 96, 3), np.float32), paths["wide_mask"], 8)
    pngs = d / "pngs"
    pngs.mkdir()
    for i, f in enumerate(synthetic_frames(n=4, shift=5)):
        Image.fromarray((f * 255).astype(np.uint8)).save(pngs / f"{i:03d}.png")
    paths["pngs"] = str(pngs)
    paths["npy"] = str(d / "edited.npy")
    np.save(paths["npy"], np.random.default_rng(0).uniform(-1, 1, (5, 64, 64, 3)).astype(np.float32))
    (d / "broken.mp4").write_bytes(b"not a video at all")
    paths["broken"] = str(d / "broken.mp4")
    return paths


# ---- servers (integration tests) ---------------------------------------------------------------------------------
def _wait_for_line(path: str, text: str, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            if text in f.read():
                return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    with open(path) as f:
        raise RuntimeError(f"`ray start` did not come up within {timeout:.0f} s: {f.read()[-3000:]}")


@pytest.fixture(scope="session")
def ray_head():
    """One Ray for the session: `ray start --head --block` in its own process group, ended by signalling that group
    at the session's end (never `ray stop`, which would end every Ray on the machine). The CPUs are detected as a
    driver's local Ray detects them; token auth is off (local only); a short temp dir, as Ray's socket paths must be."""
    temp = tempfile.mkdtemp(prefix="ivmix-ray-")
    port = free_port()
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", "--port", str(port), "--node-ip-address",
           "127.0.0.1", "--include-dashboard", "false", "--temp-dir", temp, "--disable-usage-stats"]
    # a test's own head (test_cluster) or a local ray.init (the driver-kill tests) starts beside this one
    cmd += own_ports()
    log_path = os.path.join(temp, "ray-start.log")
    with open(log_path, "w") as log:
        # the workers start in the head's folder: its temp dir, so that nothing a worker writes lands in the repo
        proc = start_server(cmd, job_env(RAY_AUTH_MODE="disabled"), log, cwd=temp)
        try:
            _wait_for_line(log_path, "Ray runtime started", proc, timeout=180)
            jobutil.SHARED_RAY_SESSION = proc.pid  # its processes' session id (start_new_session): its actors
            yield f"127.0.0.1:{port}"
        finally:
            stop_server(proc, grace=5)
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def shared_ray(ray_head, monkeypatch) -> str:
    """The jobs this test runs (through tests/jobutil.py `job_env`) join the session's Ray instead of each starting a
    local one; returns its address for `ray.init(address=...)` in the test itself. Tests that kill a driver keep their
    own local Ray (a killed driver's workers would outlive it here)."""
    monkeypatch.setattr(jobutil, "SHARED_RAY", ray_head)
    return ray_head


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's server mode (as s3fs tests itself): an S3 endpoint reachable from the job and its Ray workers. Each
    test makes its own bucket (tests/jobutil.py `s3_bucket`)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path_factory.mktemp("moto") / "moto.log", "w") as log:
        proc = start_server([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)], job_env(), log)
        try:
            wait_http(url + "/moto-api/")
            yield url
        finally:
            stop_server(proc)
