"""Manifest schema checks, id rules and per-row resolution (no Ray, no models)."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from operators.kinds import bivdiff_rows, kinds_present
from operators.manifest import ManifestError, read_schema
from operators.metadata import latest, to_table
from operators.resolve import Resolver, check_id, resolve_row, resolve_rows
from pipelines.bivdiff.config import BivdiffSpec
from pipelines.config import ModelSpec

from .jobutil import ROOT

BENCHMARKS = os.path.join(ROOT, "datasets", "benchmarks")

SPEC = ModelSpec(device="cpu")
RESOLVER = Resolver.build(SPEC)


def write(tmp_path, table, name="m.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


def test_good_manifest_and_row_count(tmp_path):
    schema, rows = read_schema(write(tmp_path, pa.table({"prompt": ["a", "b"], "steps": pa.array([4, None], pa.int32()),
                                                          "guidance": [7.5, 3.0], "idm_guidance": ["6,2,7", None],
                                                          "whatever": [1, 2]})))
    assert rows == 2 and "whatever" in schema.names


def test_folder_of_parts_is_a_manifest(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"prompt": [f"p{i}"] * 2}), d / f"part-{i}.parquet")
    assert read_schema(str(d))[1] == 6


@pytest.mark.parametrize("table, message", [
    (pa.table({"text": ["a"]}), "no 'prompt' column"),
    (pa.table({"prompt": ["a"], "steps": ["50"]}), "column 'steps' has type string; expected integer"),
    (pa.table({"prompt": [1]}), "column 'prompt' has type int64; expected string"),
    (pa.table({"prompt": ["a"], "guidance": ["7.5"]}), "column 'guidance'"),
    (pa.table({"prompt": ["a"], "seed": [1.5]}), "column 'seed' has type double"),
    (pa.table({"prompt": ["a"], "base": ["/etc/passwd"]}), "models are set by the job config only"),
    (pa.table({"prompt": ["a"], "lora": ["x.safetensors"]}), "lora"),
])
def test_bad_schemas_are_rejected_with_what_to_fix(tmp_path, table, message):
    with pytest.raises(ManifestError, match=message):
        read_schema(write(tmp_path, table))


def test_not_parquet_and_missing(tmp_path):
    bad = tmp_path / "prompts.parquet"
    bad.write_text("prompt\nA cat\n")
    with pytest.raises(ManifestError, match="not readable as Parquet"):
        read_schema(str(bad))
    with pytest.raises(ManifestError, match="does not exist"):
        read_schema(str(tmp_path / "nope.parquet"))


@pytest.mark.parametrize("good", ["horses", "chronomagic-day2night_02.0", "vbench-0001", "A.b_c-9"])
def test_safe_ids(good):
    assert check_id(good) == good


@pytest.mark.parametrize("bad",
                         ["../../etc", "../x", "a/b", "a\\b", ".hidden", "", "x" * 200, "a..b", "s3://b/k", "é", "a b",
                          5])
def test_hostile_ids_are_refused(bad):
    with pytest.raises(ValueError, match="^id:"):
        check_id(bad)


def test_resolve_row_derives_stable_ids_and_fails_bad_rows():
    a = resolve_row({"prompt": "a cat", "steps": 4}, RESOLVER)
    b = resolve_row({"prompt": "a cat", "steps": 4}, RESOLVER)
    c = resolve_row({"prompt": "a cat", "steps": 5}, RESOLVER)
    d = resolve_row({"prompt": "a cat", "steps": 4}, Resolver.build(ModelSpec(lora="x")))
    assert a["status"] == "pending" and a["id"] == b["id"] != c["id"] != d["id"] and a["id"].startswith("h")
    check_id(a["id"])
    bad = resolve_row({"prompt": "a cat", "id": "../../etc"}, RESOLVER)
    assert bad["status"] == "failed" and bad["error"].startswith("id:") and bad["id"].startswith("invalid-")
    check_id(bad["id"])
    bad = resolve_row({"prompt": "a cat", "height": 65, "id": "ok-id"}, RESOLVER)
    assert bad["status"] == "failed" and bad["id"] == "ok-id" and "height" in bad["error"]
    assert resolve_row({"prompt": None}, RESOLVER)["status"] == "failed"


def test_resolve_rows_drops_committed_and_fails_duplicates():
    batch = pa.table({"id": ["a", "b", "c", "c"], "prompt": ["x", "y", "z", "w"], "note": [1, 2, 3, 4]})
    out = resolve_rows(batch, Resolver.build({"device": "cpu"}, defaults={"steps": 4}), done=frozenset({"a"}),
                       duplicate_ids=frozenset({"c"}))
    assert out.column("_id").to_pylist() == ["b", "c", "c"]
    assert out.column("_status").to_pylist() == ["pending", "failed", "failed"]
    assert "more than one manifest row" in out.column("_error").to_pylist()[1]
    assert out.column("note").to_pylist() == [2, 3, 4]


def benchmark_like_rows() -> pa.Table:
    """Rows shaped like the public benchmark sets (ChronoMagic-Bench, VBench GPT-longer and Chinese): ids with dashes,
    underscores and dots, prompts of 80+ CLIP tokens, CJK text, quotes and a colon, extra string columns."""
    long = ("In a still frame, a weathered stop sign stands prominently at a quiet intersection, its red paint "
            "slightly faded and edges rusted, evoking a sense of time passed. " * 3).strip()
    return pa.table({
        "id": ["chronomagic-3d_printing_19", "vbench-gptlong-0001", "vbench-cn-0001", "vbench.v2.0007"],
        "prompt": ["Time-lapse of a 3D printing process: from an empty build plate to a finished model.", long,
                   "在静止的画面中，一个停车标志", 'A toilet\'s "floral" design, frozen in time'],
        "source": ["ChronoMagic-Bench", "VBench (GPT-4o enhanced)", "VBench (Chinese translation)", "VBench-2.0"],
        "dimension": [None, "temporal_flickering", "temporal_flickering", "human_anatomy"],
    })


@pytest.mark.parametrize("name", ["built", "chronomagic_bench_150.parquet", "vbench_all_dimension_gpt_longer.parquet"])
def test_benchmark_prompt_sets_validate(name, tmp_path):
    """The built rows and the real sets the repository carries (datasets/benchmarks/, datasets/README.md)."""
    path = write(tmp_path, benchmark_like_rows()) if name == "built" else os.path.join(BENCHMARKS, name)
    schema, rows = read_schema(path)
    table = pq.read_table(path)
    resolved = [resolve_row(r, RESOLVER) for r in table.to_pylist()]
    assert rows == table.num_rows and all(r["status"] == "pending" for r in resolved)
    assert [r["id"] for r in resolved] == table.column("id").to_pylist()  # dotted ids are valid keys


def test_latest_keeps_the_newest_row_per_id():
    import datetime as dt

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = [{"id": "a", "status": "failed", "finished_at": t0},
            {"id": "a", "status": "ok", "finished_at": t0 + dt.timedelta(1)},
            {"id": "b", "status": "ok", "finished_at": t0}]
    cur = latest(to_table(rows))
    assert dict(zip(cur.column("id").to_pylist(), cur.column("status").to_pylist())) == {"a": "ok", "b": "ok"}


def test_resolve_rows_when_everything_is_already_done():
    batch = pa.table({"id": ["a", "b"], "prompt": ["x", "y"]})
    out = resolve_rows(batch, Resolver.build({"device": "cpu"}), done=frozenset({"a", "b"}))
    assert out.num_rows == 0 and "_status" in out.column_names


def test_bivdiff_rows_in_manifests(tmp_path):
    """A `task` column makes BIVDiff rows: no `prompt` column needed, typed columns checked, rows resolved with the
    BIVDiff rules next to generation rows, no A/B expansion, ids derived from the BIVDiff model set."""
    schema, rows = read_schema(write(tmp_path, pa.table({"task": ["inpaint"], "source_video": ["s3://b/v.mp4"],
                                                          "mask_video": ["s3://b/m.mp4"], "alpha": [0.2],
                                                          "frame_joint_norm": [True]})))
    assert rows == 1
    with pytest.raises(ManifestError, match="column 'alpha' has type string"):
        read_schema(write(tmp_path, pa.table({"task": ["inpaint"], "alpha": ["high"]}), "bad.parquet"))
    (tmp_path / "x.npy").write_bytes(b"x")
    (tmp_path / "v.mp4").write_bytes(b"x")
    x, v = str(tmp_path / "x.npy"), str(tmp_path / "v.mp4")
    batch = pa.table({
        "id": ["e1", "e2", "g1", "e3"],
        "task": ["external", "inpaint", None, "controlnet-canny"],
        "source_video": [x, v, None, v],
        "prompt": [None, None, "a cat", "a bear"],
        "samplers": pa.array([None, None, ["standard", "ivmixed"], ["bivdiff", "bivdiff_compat"]],
                             pa.list_(pa.string())),
    })
    out = resolve_rows(batch, Resolver.build({"device": "cpu"}, defaults={"steps": 4}, bivdiff_defaults={"steps": 10}))
    ids, status, errors = (out.column(c).to_pylist() for c in ("_id", "_status", "_error"))
    assert ids == ["e1", "e2", "g1-standard", "g1-ivmixed", "e3"]
    assert status == ["pending", "failed", "pending", "pending", "failed"]
    assert errors[1].startswith("mask_video: task 'inpaint' needs a mask video")
    assert errors[4].startswith("samplers: A/B sampler groups are for generation rows")
    e1 = json.loads(out.column("_params").to_pylist()[0])
    assert out.column("_kind").to_pylist() == ["bivdiff", "bivdiff", "generation", "generation", "bivdiff"]
    assert e1["steps"] == 10 and e1["stride"] == 1 and e1["alpha"] == 1.0
    # the column counts (what the driver plans with) agree with the row-by-row kinds above: 3 BIVDiff manifest rows
    assert bivdiff_rows(batch) == 3 and kinds_present(batch) == ("generation", "bivdiff")
    only = batch.filter(pa.array([True, True, False, True]))
    assert bivdiff_rows(only) == 3 and kinds_present(only) == ("bivdiff",)
    assert bivdiff_rows(batch.drop_columns(["task"])) == 0 and kinds_present(batch.drop_columns(["task"])) == (
        "generation",)
    a = resolve_row({"task": "external", "source_video": "x.npy"}, RESOLVER)
    b = resolve_row({"task": "external", "source_video": "x.npy"}, Resolver.build(SPEC, BivdiffSpec(vdm="modelscope")))
    assert a["id"].startswith("h") and a["id"] != b["id"]  # the model set is part of a derived id


def test_bivdiff_job_config_section(tmp_path):
    import argparse

    from jobs import config as job_config

    def load(section):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"bivdiff": section}))
        return job_config.load(argparse.Namespace(
            config=str(path), manifest="m", output="o", device=None, num_actors=None, batch_size=None,
            sampler_batch=None,
            mlflow_uri=None, experiment=None, run_name=None, limit=None, fail_on_error=False, scores=False,
            baseline=None,
            regression_threshold=None, samplers=None))

    cfg = load({"vdm": "videocrafter2", "defaults": {"alpha": 0.3, "steps": 25}})
    assert cfg.bivdiff.spec.vdm == "videocrafter2" and cfg.bivdiff.defaults["alpha"] == 0.3
    for section, match in (({"vdm": "sora"}, "vdm: BIVDiff's video model"), ({"controlnet": "x"}, "unknown key"),
                           ({"defaults": {"alpha": 3}}, "alpha: must lie in"),
                           ({"defaults": {"task": "inpaint"}}, "unknown key"),
                           ({"tiny": True, "image_model": "x"}, "'tiny' builds its own models")):
        with pytest.raises(ValueError, match=match):
            load(section)


def test_missing_bivdiff_inputs_fail_at_resolution(tmp_path):
    """Inputs that do not exist fail the row in the CPU resolve stage, before any actor or model."""
    src = tmp_path / "clip.mp4"
    src.write_bytes(b"x")
    batch = pa.table({"id": ["ok", "gone"], "task": ["inpaint", "inpaint"], "source_video": [str(src), str(src)],
                      "mask_video": [str(src), str(tmp_path / "nope.mp4")]})
    out = resolve_rows(batch, Resolver.build({"device": "cpu"}))
    assert out.column("_status").to_pylist() == ["pending", "failed"]
    assert out.column("_error").to_pylist()[1] == f"mask_video: {str(tmp_path / 'nope.mp4')!r} does not exist"


def test_a_manifest_samplers_column_wins_over_the_configs():
    """docs/job.md: `samplers` in the job config (or --samplers) applies to every row; a row's own `samplers` list
    wins."""
    batch = pa.table({"id": ["a", "b"], "prompt": ["x", "y"],
                      "samplers": pa.array([["ivmixed_ad_v1", "standard"], None], pa.list_(pa.string()))})
    out = resolve_rows(batch,
                       Resolver.build({"device": "cpu"}, defaults={"steps": 4}, samplers=("standard", "ivmixed")))
    got = sorted(zip(out.column("_id").to_pylist(), out.column("_sampler").to_pylist()))
    assert got == [("a-ivmixed_ad_v1", "ivmixed_ad_v1"), ("a-standard", "standard"),
                   ("b-ivmixed", "ivmixed"), ("b-standard", "standard")]
