"""What a new user hits (README quick start, both CLIs, the job): bad outputs and model paths refused before any model
loads, outputs through fsspec, a scorer that cannot load, the nightly regression alarm, a quiet console, small things.
Every test runs the real command or the real job."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.metadata import read_latest

from .jobutil import CREDS, ROOT, job_cmd, job_env, mlflow_store, parent_runs, run_job, s3_bucket, tiny_config

SMALL = ["--steps", "2", "--frames", "2", "--height", "64", "--width", "64"]
# what a user reads as failure or noise (each was seen on the console before)
NOISE = ("core_worker.cc", "restart will fail", "Token authentication is enabled", "Progress bars disabled",
         "requires torchvision", "should be kept in float32", "Loading weights", "Writing model shards",
         "Token indices sequence length", "Execution plan of Dataset", "Creating initial MLflow database",
         "\x1b[", "FutureWarning", "DeprecationWarning")  # colour codes in a log file; library deprecation notices


def cli(module: str, *args: str, cwd: str = ROOT, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout,
                          env=env or job_env())


def in_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI's own main() in this process (no interpreter start-up): its exit status and what it printed."""
    import contextlib
    import importlib
    import io

    main = importlib.import_module(module if module != "pipelines.bivdiff" else "pipelines.bivdiff.__main__").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as stop:  # argparse: --help, usage errors
            rc = stop.code
    return subprocess.CompletedProcess([module, *args], rc, out.getvalue(), err.getvalue())


def one_error_line(r: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2 with exactly one `error:` line that names what is wrong, and no model was loaded."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert all(e in lines[0] for e in expected), lines[0]
    return lines[0]


# ---- 1. outputs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out, extra, expected", [
    ("v.gif", [], "does not end in .mp4"),
    ("v", [], "does not end in .mp4"),
    ("x.mp4", ["--output-type", "latent"], "does not end in .npy"),
    ("sub/", [], "give a file name ending in .mp4"),
    ("blocker/x.mp4", [], "is a file, not a folder"),
])
def test_a_bad_out_is_refused_before_any_model_loads(tmp_path, tiny_ad_dir, out, extra, expected):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    (tmp_path / "dir.mp4").mkdir()
    r = in_process("pipelines.sample", "--model-dir", tiny_ad_dir, "--prompt", "x", *SMALL, "--out",
                   f"{tmp_path}/{out}", *extra)
    one_error_line(r, "--out:", expected)
    assert sorted(os.listdir(tmp_path)) == ["blocker", "dir.mp4"]  # nothing written, not even a 0-byte file


def test_a_folder_named_like_a_video_is_refused(tmp_path, tiny_ad_dir):
    (tmp_path / "dir.mp4").mkdir()
    r = in_process("pipelines.sample", "--model-dir", tiny_ad_dir, "--prompt", "x", *SMALL, "--out",
                   str(tmp_path / "dir.mp4"))
    one_error_line(r, "--out:", "is a folder")


@pytest.mark.integration
def test_the_cli_writes_through_fsspec_to_s3_with_the_jobs_file_mode(s3_endpoint, tmp_path, tiny_ad_dir, monkeypatch):
    from pipelines.video import read_mp4

    fs = s3_bucket(s3_endpoint, "renders", monkeypatch)
    env = job_env(**CREDS, AWS_ENDPOINT_URL=s3_endpoint)
    r = cli("pipelines.sample", "--model-dir", tiny_ad_dir, "--prompt", "x", *SMALL, "-q", "--out",
            "s3://renders/a/v.mp4",
            cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote s3://renders/a/v.mp4" in r.stdout and os.listdir(tmp_path) == []  # no ./s3:/ folder
    local = tmp_path / "got.mp4"
    fs.get_file("renders/a/v.mp4", str(local))
    assert read_mp4(str(local))[0].shape == (2, 64, 64, 3)
    # a bucket that does not exist is bad input, found before loading
    r = cli("pipelines.sample", "--model-dir", tiny_ad_dir, "--prompt", "x", *SMALL, "--out",
            "s3://no-such-bucket/v.mp4",
            env=env)
    one_error_line(r, "--out:", "no-such-bucket")
    # a local file gets 0666 less the umask, like the job's files (mkstemp alone would leave 0600)
    r = cli("pipelines.sample", "--model-dir", tiny_ad_dir, "--prompt", "x", *SMALL, "-q", "--output-type", "latent",
            "--out", str(tmp_path / "deep" / "x.npy"))
    assert r.returncode == 0, r.stderr[-3000:]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "deep" / "x.npy").st_mode) == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path / "deep")) == ["x.npy"]


# ---- 4. model errors ---------------------------------------------------------------------------------------------
@pytest.mark.heavy
def test_model_errors_are_one_line(tmp_path, tiny_ad_dir):
    base = ["--prompt", "x", *SMALL, "--out", str(tmp_path / "v.mp4")]
    one_error_line(in_process("pipelines.sample", "--base", str(tmp_path / "typo" / "base"), *base),
                   "base:", "is not an existing file or folder")
    one_error_line(in_process("pipelines.sample", "--backbone", "modelscope", "--model-dir", tiny_ad_dir, *base),
                   "--model-dir:", "holds tiny animatediff models; pass --backbone animatediff")
    one_error_line(in_process("pipelines.sample", "--model-dir", tiny_ad_dir, "--lora",
                              str(tmp_path / "lora.safetensors"), *base),
                   "lora:", "lora.safetensors")
    # a well-formed hub id that is not in the (offline) cache: loading fails, still one line
    r = cli("pipelines.sample", "--base", "someone/not-cached", "-q", *base)
    line = one_error_line(r, "models: could not be loaded")
    assert len(line) < 700 and "Traceback" not in r.stderr
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--video-unet", "x"], "--model-dir: give either --model-dir or --video-unet"),
    (["--video-model", "x", "--image-model", "y"], "--video-model, --image-model"),
    (["--motion-adapter", "x"], "--motion-adapter"),
    (["--vdm", "videocrafter2"], "--vdm: the tiny BIVDiff set holds ModelScope-architecture and VidRD video models"),
    (["--vdm", "animatediff"], "animatediff needs its own models (--video-model, --motion-adapter)"),
])
def test_bivdiff_model_dir_refuses_what_it_would_ignore(tmp_path, extra, expected):
    (tmp_path / "models").mkdir()
    (tmp_path / "src.npy").write_bytes(b"")
    r = in_process("pipelines.bivdiff", "--task", "external", "--model-dir", str(tmp_path / "models"), "--video",
            str(tmp_path / "src.npy"), "--out", str(tmp_path / "o.mp4"), *extra)
    one_error_line(r, expected)


# ---- 5. the README's laptop commands: tests/test_doc_commands.py ------------------------------------------------


# ---- 7. help and listings ----------------------------------------------------------------------------------------
def test_help_shows_defaults_exit_codes_and_listings():
    from pipelines.presets import PRESETS

    PRESET_LIST = list(PRESETS.values())
    h = " ".join(in_process("pipelines.sample", "--help").stdout.split())  # argparse wraps lines
    assert "exit status: 0" in h and "animatediff: 16 frames x 512x512, 50 steps, 8 fps" in h
    assert "default 0" in h and "default 7.5" in h and "--steps 6 --frames 8 --height 64 --width 64" in h
    presets = in_process("pipelines.sample", "--list-presets").stdout.splitlines()[2:]  # a title and a header first
    assert [p.split()[0] for p in presets] == ["standard", "ivmixed", "ivmixed_fast", "freeu", "freeinit",
                                               "cfg_interval", "pag", "freenoise", "videoelevator", "ivmixed_freeu",
                                               "ivmixed_ad_v1", "ivmixed_ms_v1", "ivmixed_vc_v1"]
    assert "ivmixed_ms_v1" in presets[11] and "modelscope" in presets[11]
    # the columns line up for the long official variants too: each description starts at the same place
    assert len({line.index(p.description) for line, p in zip(presets, PRESET_LIST)}) == 1, presets
    backbones = in_process("pipelines.sample", "--list-backbones").stdout
    assert "zeroscope" in backbones and "adamdad/videocrafterv2_diffusers" in backbones
    assert "exit status: 0" in in_process("pipelines.bivdiff", "--help").stdout
    from jobs.generate import build_parser

    job = " ".join(build_parser().format_help().split())
    assert "3 a quality regression" in job and "2 bad input" in job


# ---- 2, 4: job-level refusals before any generation --------------------------------------------------------------
def _manifest(path, n: int = 3, **cols) -> str:
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [f"prompt {i}" for i in range(n)], **cols}),
                   path)
    return str(path)


@pytest.mark.heavy
def test_job_refuses_foreign_presets_and_a_scorer_that_cannot_load(tmp_path, tiny_cache):
    manifest = _manifest(tmp_path / "m.parquet")
    db = ["--mlflow-uri", f"sqlite:///{tmp_path / 'db.sqlite'}"]
    r = run_job("--config", tiny_config(tmp_path / "a.yaml", tiny_cache), "--manifest", manifest, "--output",
                str(tmp_path / "out"), "--samplers", "standard,ivmixed_ms_v1", *db)
    assert (r.returncode == 2
            and "--samplers: ivmixed_ms_v1 reproduce(s) another backbone's code (modelscope)" in r.stderr)
    cfg = tiny_config(tmp_path / "b.yaml", tiny_cache, scores={"enabled": True, "tiny": False,
                                                             "clip_model": str(tmp_path / "no-clip")})
    r = run_job("--config", cfg, "--manifest", manifest, "--output", str(tmp_path / "out"), *db)
    assert r.returncode == 2 and "error: scores.clip_model:" in r.stderr and "no-clip" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # refused before any video


@pytest.mark.heavy
def test_an_output_file_an_empty_manifest_and_a_pool_too_big_stop_before_ray(tmp_path):
    """The checks that need no Ray run before it starts, and create nothing: an --output that is a file (exit 2, one
    line, the file untouched), a manifest with no rows (exit 0, nothing to do), a pool this machine's local Ray could
    not hold (exit 2). Each job's own local Ray (no RAY_ADDRESS): it never starts."""
    cfg = tiny_config(tmp_path / "job.yaml", str(tmp_path / "tiny"))
    manifest, empty = _manifest(tmp_path / "m.parquet"), tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), empty)
    taken = tmp_path / "a-file.txt"
    taken.write_text("keep me")
    db = tmp_path / "db.sqlite"
    common = ("--config", cfg, "--mlflow-uri", f"sqlite:///{db}")
    out = ("--output", str(tmp_path / "out"))

    runs = [run_job(*common, "--manifest", manifest, "--output", str(taken))]
    r = runs[-1]
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: output: {str(taken)!r} is a file; give a folder or an " \
                                               "object-store prefix" and "Traceback" not in r.stderr
    assert taken.read_text() == "keep me"

    runs.append(r := run_job(*common, "--manifest", str(empty), *out))
    assert r.returncode == 0 and f"nothing to do: the manifest {empty} has no rows" in r.stderr, r.stderr[-3000:]

    runs.append(r := run_job(*common, "--manifest", manifest, *out, "--num-actors", "64"))
    assert r.returncode == 2 and "error: compute: 64 actors x" in r.stderr, r.stderr[-3000:]
    if not any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):  # CI and dev machines: no GPU
        runs.append(r := run_job(*common, "--manifest", manifest, *out, "--device", "cuda"))
        assert r.returncode == 2 and "compute.num_actors: 1 GPU actors need 1 GPUs; the cluster has 0" in r.stderr
    assert not any("starting Ray" in r.stderr for r in runs)
    assert not (tmp_path / "out").exists() and not db.exists() and not (tmp_path / "tiny").exists()


@pytest.mark.heavy
def test_a_scorer_that_fails_in_the_actor_keeps_every_video(tmp_path, tiny_ad_dir):
    """The actor's scorer cannot load (e.g. a node without the CLIP files): rows stay ok, videos stay, scores are
    null with the reason (the operator called as Ray Data calls it)."""
    from dataclasses import asdict

    from operators.actors import VideoGenerator
    from operators.resolve import Resolver, resolve_rows
    from operators.scoring import ScoreModels
    from pipelines.config import ModelSpec

    spec = asdict(ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", dtype="float32"))
    resolver = Resolver.build(spec, defaults={"steps": 2, "frames": 2, "height": 64, "width": 64})
    batch = resolve_rows(pa.table({"id": ["a", "b"], "prompt": ["one", "two"]}), resolver)
    gen = VideoGenerator(resolver, str(tmp_path / "out"), "run", "test", sampler_batch=2,
                         scorer=ScoreModels(str(tmp_path / "no-clip"), str(tmp_path / "no-dino")))
    rows = gen(batch).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert all(r["clipsim"] is None and "while loading the scorer" in r["score_error"] for r in rows)
    assert sorted(os.listdir(tmp_path / "out" / "videos")) == ["a.mp4", "b.mp4"]


@pytest.mark.integration
def test_ctrl_c_is_one_line_exit_130_a_killed_run_and_no_lease(tmp_path, tiny_cache):
    """SIGINT (Ctrl-C) to the driver while rows run (its own local Ray): exit 130 with one line, the output's lease
    released, the MLflow run KILLED; the rerun resumes and ends 0. The interrupted run's rows are at AnimateDiff's full
    size on a CPU actor: the job says so, with the row count and a time, before the first row (issue 29, item 1)."""
    from mlflow.tracking import MlflowClient

    common = dict(commit={"progress_seconds": 1}, mlflow={"experiment": "ctrl-c"}, scores={"enabled": False})
    full = tiny_config(tmp_path / "full.yaml", tiny_cache, defaults={"steps": 50, "frames": 16, "height": 512,
                                                                    "width": 512}, **common)
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, defaults={"steps": 2, "frames": 4, "height": 32, "width": 32},
                      **common)
    out, db, log = tmp_path / "out", tmp_path / "db.sqlite", tmp_path / "stderr.txt"
    args = ("--manifest", _manifest(tmp_path / "m.parquet", n=6), "--output", str(out), "--mlflow-uri",
            mlflow_store(db))
    env = {k: v for k, v in job_env().items() if k != "RAY_ADDRESS"}
    with open(log, "w") as err:
        proc = subprocess.Popen(job_cmd("--config", full, *args), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err)
        try:
            deadline = time.monotonic() + 300
            while "working: " not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)  # the heartbeat says rows are running: the MLflow run is open
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 130, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert text.strip().splitlines()[-1] == "interrupted; rerun the same command to resume", text[-4000:]
    assert "Traceback" not in text and not (out / "_lease.json").exists()
    # 6 rows x 50 steps x 16 x 512 x 512 at 2e-5 s each, one actor: 7.0 h; told once, before the first row came back
    warning = ("6 row(s) run at sizes up to 16 x 512x512, 50 steps on CPU actors: at least 7.0 h with 1 actor(s), "
               "even with tiny models")
    assert text.count(warning) == 1 and text.index(warning) < text.index("working: "), text[-4000:]
    (run,) = parent_runs(MlflowClient(f"sqlite:///{db}"), "ctrl-c")
    assert run.info.status == "KILLED" and run.data.tags["job_status"] == "KILLED"
    r = run_job("--config", cfg, *args)  # the laptop size: resumes and finishes
    assert "on CPU actors: at least" not in r.stderr
    assert r.returncode == 0 and "progress: " in r.stderr, r.stderr[-4000:]


def _loading(proc: subprocess.Popen, library: str, timeout: float = 60) -> None:
    """Wait until the process has mapped `library` (a shared object of torch or Ray): it is importing its libraries."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/maps") as f:
            if library in f.read():
                return
        time.sleep(0.02)
    raise AssertionError(f"{library} never loaded (exit {proc.poll()})")


@pytest.mark.heavy
@pytest.mark.parametrize("when", ["loading", "sampling"])
def test_ctrl_c_of_the_cli_is_one_line_and_130(tmp_path, tiny_ad_dir, when):
    """SIGINT to `pipelines.sample` while it imports torch and diffusers, or while it samples: exit 130, one line, no
    video (issue 29, item 5: the import gave a chained traceback, sampling ~70 lines)."""
    out, log = tmp_path / "v.mp4", tmp_path / "stderr.txt"
    with open(log, "w") as err:
        argv = ["--model-dir", tiny_ad_dir, "--prompt", "a", "--steps", "50", "--frames", "8", "--height", "64",
                "--width", "64", "--out", str(out)]
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.sample", *argv], cwd=ROOT, env=job_env(),
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            if when == "loading":
                _loading(proc, "libtorch_cpu")
            else:
                deadline = time.monotonic() + 120
                while "sampling:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "Traceback" not in text and text.strip().splitlines()[-1] == "interrupted; nothing half-written was left"
    assert not out.exists() and os.listdir(tmp_path) == ["stderr.txt"]


@pytest.mark.heavy
def test_ctrl_c_of_the_job_while_it_loads_creates_nothing(tmp_path):
    """SIGINT to the job while it imports Ray and torch: exit 130 and the one line, no traceback, no output folder."""
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    args = ("--config", os.path.join(ROOT, "jobs", "configs", "tiny.yaml"), "--manifest",
            _manifest(tmp_path / "m.parquet"), "--output", str(out), "--mlflow-uri", f"sqlite:///{tmp_path / 'db'}")
    with open(log, "w") as err:
        proc = subprocess.Popen(job_cmd(*args), env=job_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _loading(proc, "_raylet")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert log.read_text().strip() == "interrupted; rerun the same command to resume"
    assert not out.exists() and not (tmp_path / "db").exists()


# ---- 3, 6, 7: the nightly alarm, a quiet console, the small things -----------------------------------------------
@pytest.mark.integration
@pytest.mark.usefixtures("shared_ray")
def test_nightly_alarm_quiet_console_and_small_things(tmp_path, tiny_cache):
    from mlflow.tracking import MlflowClient

    home, cwd = tmp_path / "ivmix-home", tmp_path / "cwd"
    cwd.mkdir()
    env = job_env(IVMIX_HOME=str(home))
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, defaults={"steps": 2, "frames": 4, "height": 32, "width": 32},
                      commit={"progress_seconds": 0})
    good = _manifest(tmp_path / "good.parquet")
    # every row fails validation; two rows share an id
    bad = _manifest(tmp_path / "bad.parquet", height=[65, 66, 67], id=["r0", "r0", "r2"])

    def night(name, manifest, *extra):
        return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "generate.py"), "--config", cfg, "--manifest",
                               manifest, "--output", str(tmp_path / name), "--experiment", "nightly", *extra],
                              capture_output=True, text=True, env=env, cwd=cwd, timeout=600)

    r = night("n1", good, "--limit", "2", "--baseline", "last")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "manifest: 3 rows (--limit 2: the first 2); 0 ids already committed" in r.stderr
    assert r.stderr.count("progress: 2/2 rows (2 ok, 0 failed)") == 1  # the last line is not logged twice
    assert "(2 videos, 0 failed ids; the report shows one row per id)" in r.stderr
    assert not [n for n in NOISE if n in r.stderr], r.stderr[-4000:]
    # MLflow lives in one per-user folder, never in the current one
    assert os.listdir(cwd) == [] and sorted(os.listdir(home)) == ["mlartifacts", "mlflow.db"]

    # a rerun with nothing to do says so and starts no Ray; without a baseline it never opens MLflow (no store made)
    never = tmp_path / "never.db"
    r = night("n1", good, "--limit", "2", "--mlflow-uri", f"sqlite:///{never}")
    assert r.returncode == 0 and "nothing to do: every row of the first 2 is committed ok" in r.stderr
    assert "starting Ray" not in r.stderr and not never.exists()

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (first,) = parent_runs(client, "nightly")
    assert first.data.tags["healthy"] == "true"

    # a night where every row fails is a regression (success rate), and the failed rows keep their sampler
    r = night("n2", bad, "--baseline", "last")
    assert r.returncode == 3, r.stderr[-4000:]
    assert "ivmixed success_rate: 0 vs baseline 1" in r.stderr
    # the console says what each count counts: rows (progress) or ids (report, quality) (issue 29, item 9)
    assert "3 row(s) to run" in r.stderr and "manifest: 2 rows share 1 id(s) ('r0')" in r.stderr
    assert "progress: 3/3 rows (0 ok, 3 failed)" in r.stderr and "(0 videos, 2 failed ids;" in r.stderr
    assert "ivmixed: 0/2 ids ok" in r.stderr, r.stderr[-4000:]
    assert {(m["status"], m["sampler"]) for m in read_latest(str(tmp_path / "n2")).to_pylist()} == {
        ("failed", "ivmixed")}
    # the regressed night never becomes the baseline: the next bad night compares with the first one and fails too
    r = night("n3", bad, "--baseline", "last")
    assert r.returncode == 3, r.stderr[-4000:]
    runs = {x.data.tags["output"].rsplit("/", 1)[-1]: x for x in parent_runs(client, "nightly")}
    assert runs["n3"].data.tags["regression_baseline"] == first.info.run_id
    assert runs["n2"].data.tags["healthy"] == runs["n3"].data.tags["healthy"] == "false"

    # an unknown baseline run is bad input, found before any video
    r = night("n4", good, "--baseline", "0123456789abcdef")
    assert r.returncode == 2 and "error: --baseline: no MLflow run '0123456789abcdef'" in r.stderr
    assert not (tmp_path / "n4").exists()


def test_a_sampler_missing_from_the_night_is_a_regression():
    from jobs import quality

    base = {"standard.success_rate": 1.0, "standard.clipsim_mean": 0.3, "ivmixed.success_rate": 1.0}
    found = quality.compare({"standard.success_rate": 1.0, "standard.clipsim_mean": 0.3}, base, 0.05)
    assert found == ["ivmixed: no rows in this run (the baseline had them, success rate 1)"]
    found = quality.compare({"standard.success_rate": 0.0, "ivmixed.success_rate": 1.0}, base, 0.05)
    assert found == ["standard clipsim_mean: no scored video in this run (baseline 0.3)",
                     "standard success_rate: 0 vs baseline 1 (threshold 5%)"]
    groups = {"standard": {"n": 2.0, "success_rate": 0.98}}
    assert not quality.healthy(groups, [], {"standard.success_rate": 1.0})  # within the threshold, still below
    assert quality.healthy(groups, [], {"standard.success_rate": 0.9}) and not quality.healthy(groups, ["x"], {})


def test_every_shipped_job_config_loads():
    import argparse

    from jobs import config as job_config
    from jobs.generate import build_parser

    folder = os.path.join(ROOT, "jobs", "configs")
    names = sorted(os.listdir(folder))
    assert {"tiny.yaml", "tiny-bivdiff.yaml", "animatediff.yaml", "bivdiff.yaml"} <= set(names)
    for name in names:
        args: argparse.Namespace = build_parser().parse_args(["--config", os.path.join(folder, name), "--manifest", "m",
                                                              "--output", "o"])
        cfg = job_config.load(args)
        assert cfg.mlflow_uri  # a default store is always chosen
    tiny = job_config.load(build_parser().parse_args(["--config", os.path.join(folder, "tiny-bivdiff.yaml"),
                                                      "--manifest",
                                                      "m", "--output", "o"]))
    assert tiny.bivdiff.tiny and tiny.bivdiff.defaults["steps"] == 5 and tiny.tiny == "animatediff"
    # its generation rows run at the laptop size too, not AnimateDiff's full 16 x 512 x 512, 50 steps
    for laptop in ("tiny.yaml", "tiny-bivdiff.yaml"):
        d = job_config.load(build_parser().parse_args(["--config", os.path.join(folder, laptop), "--manifest", "m",
                                                       "--output", "o"])).defaults
        assert d["frames"] <= 8 and d["height"] <= 64 and d["width"] <= 64 and d["steps"] <= 6, (laptop, d)


def test_the_tiny_tokenizer_keeps_a_tagged_bivdiff_prompt_within_clip_length(tmp_path, caplog):
    """Item 9: BIVDiff's quality tags and negative prompt are about one tiny-set token a word, as with CLIP's own
    vocabulary (~40 tokens), so a tagged prompt is not truncated on the tiny set alone; a prompt that is truly long
    still is, once (the text encoder's own path, pipelines/backbones/common.py)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines import presets
    from pipelines.backbones import common
    from pipelines.fixtures.tokenizer import build_tokenizer

    tok = build_tokenizer(str(tmp_path / "tok"))
    tagged = "a bear walking through a snow mountain" + presets.BIVDIFF_POS
    words = [len(t.split()) for t in (tagged, presets.BIVDIFF_NEG)]
    counts = [len(tok(t).input_ids) for t in (tagged, presets.BIVDIFF_NEG)]
    assert all(c <= 77 for c in counts) and counts[1] <= 2 * words[1] + 2, counts
    assert max(tok.get_vocab().values()) < 1000  # the tiny text encoders' vocabulary
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=77))
    common._TRUNCATED.clear()
    with caplog.at_level("WARNING"):
        common.encode_prompts(tok, encoder, [tagged, presets.BIVDIFF_NEG], torch.device("cpu"))
        assert "truncated" not in caplog.text
        common.encode_prompts(tok, encoder, [tagged + " with waves" * 20], torch.device("cpu"))
    assert caplog.text.count("CLIP tokens are truncated") == 1
    common._TRUNCATED.clear()
