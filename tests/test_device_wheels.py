"""The GPU check on a bare GPU image (README "GPU check"): such an image holds Python 3.12, torch + CUDA, transformers
5.17, huggingface_hub 1.33, numpy, pyarrow, fsspec, opencv-headless, accelerate and safetensors, and reaches no package
index. `make device-wheels` downloads what it lacks for the check (infra/gpu-check/wheels.txt); this test builds an
environment holding only the image's packages (this project's CPU torch and the others linked from the project's
environment, transformers and huggingface_hub installed at the image's versions) plus the versions that folder holds
(installed for this machine's Python, whose tags differ), and runs `gpu_check --smoke` there: the GPU check's code
path, every backbone and preset, on the CPU with tiny models."""
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from .jobutil import ROOT

IMAGE = ("torch", "numpy", "pyarrow", "fsspec", "safetensors", "opencv-python-headless", "accelerate")
PINNED = ("transformers==5.17.0", "huggingface_hub==1.33.0")  # the image's versions, installed with their needs
LIMIT_MIB = 60


def closure(names: tuple[str, ...], leave: set[str]) -> set[str]:
    """The distributions `names` need in this environment, transitively (extras not asked for are left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = md.distribution(todo.pop()).metadata["Name"]
        key = name.lower().replace("_", "-")
        if key in seen or key in leave:
            continue
        seen.add(key)
        for text in md.requires(name) or []:
            req = Requirement(text)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and \
                    req.name.lower().replace("_", "-") not in leave:
                todo.append(req.name)
    return seen


def link(names: set[str], site: str) -> None:
    """Each distribution's top-level files and folders, linked into `site` (a folder on the new environment's path)."""
    os.makedirs(site, exist_ok=True)
    for name in names:
        dist = md.distribution(name)
        tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = os.path.join(str(dist.locate_file("")), top)
            if os.path.exists(src) and not os.path.exists(os.path.join(site, top)):
                os.symlink(src, os.path.join(site, top))


@pytest.mark.integration
def test_the_gpu_check_runs_on_the_images_packages_plus_the_device_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    make = subprocess.run(["make", "-s", "device-wheels", f"DEVICE_WHEELS={wheels}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert make.returncode == 0, make.stderr[-3000:]
    files = sorted(os.listdir(wheels))
    assert sum(os.path.getsize(wheels / f) for f in files) <= LIMIT_MIB * 2**20
    for f in files:  # built for the image: CPython 3.12 on x86-64 Linux, or pure Python
        tags = f[:-4].split("-")[-3:]
        assert tags[0] in ("py3", "cp312") and (tags[2] == "any" or "x86_64" in tags[2] and "linux" in tags[2]), f
    with open(os.path.join(ROOT, "infra", "gpu-check", "wheels.txt")) as fh:
        listed = [line.split("==") for line in fh.read().split("\n") if line and not line.startswith("#")]
    held = [re.match(r"([^-]+)-([^-]+)-", f).groups() for f in files]
    assert sorted((n.lower().replace("_", "-"), v) for n, v in held) == sorted(
        (n.lower().replace("_", "-"), v) for n, v in listed)

    env_dir, image_site, extra = tmp_path / "image", tmp_path / "image-site", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    python = str(env_dir / "bin" / "python")
    link(closure(IMAGE, leave={"transformers", "huggingface-hub"}), str(image_site))
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "image.pth"), "w") as fh:
        fh.write(str(image_site) + "\n")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *PINNED], check=True, timeout=600, capture_output=True)
    # the newest typer (a transformers need) pulls pydantic in; the image's typer does not, and the image has none
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "pydantic", "pydantic-core"], check=True,
                   timeout=120, capture_output=True)
    # the folder's versions for this machine's Python (its own tags), beside the image as on the GPU machine
    subprocess.run([*pip, "--no-deps", "--target", str(extra), *(f"{n}=={v}" for n, v in held)], check=True,
                   timeout=600, capture_output=True)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=f"{extra}{os.pathsep}{ROOT}", HF_HUB_OFFLINE="1")
    probe = ("import importlib.util as u, transformers, huggingface_hub; "
             "print(transformers.__version__, huggingface_hub.__version__, "
             "[m for m in ('ray', 'mlflow', 'pydantic', 'diffusers', 'imageio_ffmpeg') if u.find_spec(m)])")
    bare = subprocess.run([python, "-c", probe], capture_output=True, text=True, env={**env, "PYTHONPATH": ""})
    assert bare.stdout.split("\n")[0] == "5.17.0 1.33.0 []", bare.stderr[-2000:]  # the image alone lacks them
    carried = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env)
    assert carried.stdout.split("\n")[0] == "5.17.0 1.33.0 ['pydantic', 'diffusers']", carried.stderr[-2000:]

    out = tmp_path / "check.json"
    check = subprocess.run([python, "benchmarks/gpu_check.py", "--smoke", "--models", str(tmp_path / "models"),
                            "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert check.returncode == 0, check.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [r["backbone"] for r in report["results"]] == ["animatediff", "modelscope", "videocrafter2"]
    for r in report["results"]:
        samplers = [p["sampler"] for p in r["presets"]]
        assert samplers[:3] == ["standard", "ivmixed", "ivmixed_fast"] and samplers[3].endswith("_v1")
        standard, ivmixed = r["presets"][0], r["presets"][1]
        assert standard["calls"] == {"I": 0, "V": 2}  # plain DDIM: one VDM call per step, 2 steps
        assert ivmixed["calls"]["I"] > 0 and ivmixed["calls"]["V"] > 2
        fast = r["presets"][2]  # 2 steps: the first zigzags, its second VDM call reuses the first's pair
        assert fast["calls"] == {"I": 2, "V": 3}
        for p in r["presets"]:  # every model call the sampler made was timed, once
            assert p["timed_calls"] == {k: n for k, n in p["calls"].items() if n}
            assert 0 < p["busy_fraction"] <= 1.0
        assert [b["batch"] for b in r["batches"]] == [1, 2]
        o = r["options"]  # the speed options' pass on the same models and rows (smoke: channels-last, no compile)
        assert (o["compile"], o["channels_last"], o["compiled"]) == ("off", "on", 0) and o["channels_last_convs"] > 0
        assert o["calls"] == ivmixed["calls"] and 0 <= o["rel_diff"] < 1e-4 and o["host_syncs"] is None
    # beside code written with diffusers alone (AnimateDiff): the same latents (bit for bit for diffusers' pipeline)
    assert [[b["sampler"] for b in r["baselines"]] for r in report["results"]] == [["standard", "ivmixed"], [], []]
    standard, ivmixed = report["results"][0]["baselines"]
    assert standard["rel_diff"] == 0.0 and ivmixed["rel_diff"] < 1e-4
    assert "videos per hour" in check.stdout and "ms/IDM" in check.stdout and "exact speed options" in check.stdout
