"""Parameter resolution and validation (shared by the CLI, the job and manifest rows), and the CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest

from pipelines import presets
from pipelines.backbones import registry
from pipelines.config import ModelSpec, resolve_params
from pipelines.sample import main


def test_preset_defaults_and_precedence():
    p = resolve_params({"prompt": "x"})
    assert (p.sampler, p.variant, p.steps, p.frames, p.height, p.width, p.guidance) == (
        "ivmixed", "down:IV-IV", 50, 16, 512, 512, 7.5)
    assert resolve_params({"prompt": "x", "sampler": "ivmixed_ad_v1"}).seed == 23523
    assert resolve_params({"prompt": "x", "sampler": "standard"}).variant == "standard"
    # preset < pattern options < job defaults < row values
    p = resolve_params({"prompt": "x", "variant": "IV-IV@interval=0..9,w_main=5"})
    assert p.interval.text() == "0..9" and p.guidance == 5.0
    p = resolve_params({"prompt": "x", "variant": "IV-IV@w_main=5"}, {"guidance": 6.0})
    assert p.guidance == 6.0
    p = resolve_params({"prompt": "x", "steps": 10, "guidance": None}, {"steps": 20, "guidance": 3.0})
    assert p.steps == 10 and p.guidance == 3.0
    assert resolve_params({"prompt": "x", "seed": None}).seed == presets.DEFAULT_SEED  # null cell -> default


@pytest.mark.parametrize("row, param", [
    ({"variant": "IX-IV"}, "variant"),
    ({"variant": "IV-I"}, "variant"),
    ({"interval": "5..2"}, "interval"),
    ({"interval": "0..60"}, "interval"),
    ({"interval": "0.5..0.5"}, "interval"),
    ({"height": 100}, "height"),
    ({"width": 513}, "width"),
    ({"frames": 0}, "frames"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"guidance": float("inf")}, "guidance"),
    ({"guidance": "abc"}, "guidance"),
    ({"idm_guidance": "nan"}, "idm_guidance"),
    ({"vdm_guidance": "6,2,7,1"}, "vdm_guidance"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
    ({"zz": 0}, "zz"),
    ({"sampler": "nope"}, "sampler"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"negative_prompt": 3}, "negative_prompt"),
    ({"fps": 0}, "fps"),
])
def test_bad_values_name_the_parameter(row, param):
    with pytest.raises(ValueError, match=rf"^{param}:"):
        resolve_params({"prompt": "a cat", **row})


@pytest.mark.parametrize("name", ["guidance", "seed", "steps"])
def test_nan_is_an_error_not_a_null(name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        resolve_params({"prompt": "x", name: float("nan")})


def test_model_spec_validation():
    with pytest.raises(ValueError, match="backbone"):
        ModelSpec(backbone="sora")
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec(dtype="float8")
    spec = ModelSpec()
    assert spec.base == registry.defaults("animatediff").base  # hub ids come from the backbone classes only
    assert spec.fingerprint() == ModelSpec(device="cpu").fingerprint() != ModelSpec(lora="x").fingerprint()


@pytest.mark.parametrize("argv, message", [
    (["--height", "65"], "height"),
    (["--variant", "IV-I"], "variant"),
    (["--interval", "3..1"], "interval"),
    (["--frames", "0"], "frames"),
    (["--steps", "0"], "steps"),
    (["--idm-guidance", "nan"], "idm_guidance"),
    (["--guidance", "nan"], "guidance"),
    (["--model-dir", "/nonexistent-dir"], "model-dir"),
    (["--device", "cuda:0", "--model-dir", "."], "device"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path, tiny_ad_dir):
    out = tmp_path / "v.mp4"
    models = [] if "--model-dir" in argv else ["--model-dir", tiny_ad_dir]
    rc = main(["--prompt", "a cat", "--out", str(out), *models, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


@pytest.mark.heavy
def test_cli_writes_latents_and_mp4(tiny_ad_dir, tmp_path):
    from pipelines.video import read_mp4

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    common = [sys.executable, "-m", "pipelines.sample", "--model-dir", tiny_ad_dir, "--device", "cpu", "--prompt",
              "a cat",
              "--steps", "4", "--frames", "6", "--height", "64", "--width", "96", "--seed", "1"]
    r = subprocess.run(common + ["--output-type", "latent", "--out", str(tmp_path / "x.npy")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "model calls=16 (IDM 6, VDM 10)" in r.stdout
    lat = np.load(tmp_path / "x.npy")
    assert lat.shape == (1, 4, 6, 8, 12) and lat.dtype == np.float32
    r = subprocess.run(common + ["--sampler", "standard", "--fps", "12", "--out", str(tmp_path / "v.mp4")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    frames, fps = read_mp4(str(tmp_path / "v.mp4"))
    assert frames.shape == (6, 64, 96, 3) and fps == 12
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".partial")]


# ---- one parameter table (pipelines/params.py) drives every surface -------------------------------------------------
def test_every_surface_comes_from_the_parameter_table():
    """Manifest column types, both CLIs' flags, the job's defaults keys and the metadata columns list exactly the
    declared parameters of each kind; docs/parameters.md is the table's own rendering."""
    from jobs import config as job_config
    from operators import metadata
    from operators.manifest import COLUMNS
    from pipelines import params
    from pipelines.bivdiff.__main__ import build_parser as bivdiff_parser
    from pipelines.sample import build_parser as sample_parser

    for kind, parser in ((params.GENERATION, sample_parser()), (params.BIVDIFF, bivdiff_parser())):
        names = set(params.names(kind))
        assert names <= set(COLUMNS) and names <= set(metadata.SCHEMAS[kind].names)
        assert names <= {a.dest for a in parser._actions}
        other = params.BIVDIFF if kind == params.GENERATION else params.GENERATION
        # no null columns of the other kind
        assert not (set(params.names(other)) - names) & set(metadata.SCHEMAS[kind].names)
    assert set(job_config.DEFAULT_KEYS) == set(params.names(params.GENERATION))
    assert set(job_config.BIVDIFF_DEFAULT_KEYS) == set(params.names(params.BIVDIFF)) - {
        "task", "source_video", "mask_video", "condition_video"}
    assert COLUMNS["idm_guidance"] == ("string", "integer", "floating") and COLUMNS["alpha"] == ("integer", "floating")
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "parameters.md")) as f:
        assert f.read() == params.markdown()  # regenerate: python -m pipelines.params > docs/parameters.md


def test_resolved_params_round_trip_through_their_record():
    """The actor rebuilds a row's parameters from its record without validating again: the same object comes back."""
    from pipelines.bivdiff.config import BivdiffParams, resolve_bivdiff_params
    from pipelines.config import GenParams

    for row in ({"prompt": "x"},
                {"prompt": "y", "sampler": "ivmixed_ad_v1", "idm_guidance": "6,2,1/7", "interval": "0.1..0.6"},
                {"prompt": "z", "variant": "up:RR-II@w_go_I=-karras(6,2,7)", "zz": 3, "steps": 30, "guidance": 5}):
        p = resolve_params(row)
        assert GenParams.from_record(p.record()) == p
    b = resolve_bivdiff_params({"task": "inpaint", "source_video": "s.mp4", "mask_video": "m.mp4", "idm_guidance": 6.5})
    assert BivdiffParams.from_record(b.record()) == b and b.record()["idm_guidance"] == "6.5"


def test_structure_read_from_the_model_configs_equals_the_loaded_models(tiny_ad_dir, ad_backbone):
    """The driver's structural facts (VAE factor, motion-adapter frame limit) come from config files, without weights,
    and agree with the loaded backbone; a row past them fails at resolution with the loaded models' message."""
    from pipelines.backbones.registry import structure
    from pipelines.params import Structure

    spec = ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu")
    facts = structure(spec)
    assert facts == ad_backbone.structure and facts.max_frames == ad_backbone.unet.config.motion_max_seq_length
    too_many = facts.max_frames + 1
    with pytest.raises(ValueError, match=f"^frames: the motion adapter handles at most {facts.max_frames} frames"):
        resolve_params({"prompt": "x", "frames": too_many, "height": 64, "width": 64}, structure=facts)
    with pytest.raises(ValueError, match="multiple of the VAE factor 16"):
        resolve_params({"prompt": "x", "height": 72, "width": 64}, structure=Structure(16))
    assert structure(ModelSpec(device="cpu",
                               base="/no/such/folder")) == Structure()  # unreadable: defaults, with a warning
