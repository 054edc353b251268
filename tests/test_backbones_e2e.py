"""Every preset on every backbone it applies to, end to end on tiny models: through `pipelines.sample` and through
the Ray job's CPU mode (backbone chosen by the job config, preset per manifest row)."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.metadata import read_latest
from pipelines import presets
from pipelines.backbones import registry
from pipelines.sample import main as sample_main

from .jobutil import mlflow_store, run_job, tiny_config

# the registered backbones with a tiny set of their own; animatediff's presets run in test_animatediff.py
BACKBONES = tuple(n for n, c in registry.BACKBONES.items() if c.tiny is not None and n != "animatediff")


def presets_for(backbone):
    return [n for n, p in presets.PRESETS.items() if not p.backbones or backbone in p.backbones]


@pytest.fixture(scope="module")
def tiny_dirs(tiny_root, tiny_model):
    """(the session's tiny cache, backbone -> its tiny set)"""
    return tiny_root, {b: tiny_model(b) for b in BACKBONES}


@pytest.mark.heavy
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_preset_through_the_cli(backbone, tiny_dirs, tmp_path):
    for name in presets_for(backbone):
        out = tmp_path / f"{name}.npy"
        rc = sample_main(["--backbone", backbone, "--model-dir", tiny_dirs[1][backbone], "--device", "cpu", "--prompt",
                          "a cat",
                          "--sampler", name, "--steps", "4", "--frames", "3", "--height", "64", "--width", "64",
                          "--output-type", "latent", "--out", str(out), "-q"])
        assert rc == 0 and np.load(out).shape == (1, 4, 3, 8, 8), name


@pytest.mark.integration
@pytest.mark.usefixtures("shared_ray")
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_preset_through_the_job(backbone, tiny_dirs, tmp_path):
    names = presets_for(backbone)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": names, "prompt": [f"prompt for {n}" for n in names], "sampler": names}), manifest)
    cfg = tiny_config(tmp_path / "job.yaml", tiny_dirs[0], tiny=backbone, scores={"enabled": False},
                      defaults={"steps": 4, "frames": 3})
    r = run_job("--config", cfg, "--manifest", str(manifest), "--output", str(tmp_path / "out"),
                "--mlflow-uri", mlflow_store(tmp_path / 'db'))
    assert r.returncode == 0, r.stderr[-3000:]
    meta = {m["id"]: m for m in read_latest(str(tmp_path / "out")).to_pylist()}
    assert {i: m["status"] for i, m in meta.items()} == {n: "ok" for n in names}
    assert all(os.path.exists(tmp_path / "out" / "videos" / f"{n}.mp4") for n in names)
    assert {m["backbone"] for m in meta.values()} == {backbone}
