"""Deployment files: schemas (Kubernetes core objects with kubernetes-validate, KubeRay objects against the CRD
fields they use, compose against the compose-spec schema, the Dockerfile with hadolint), command lines that
parse with the job's own parser, and versions that agree with the project's pins."""
import argparse
import os
import re
import shlex
import stat
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml

from jobs import config as job_config
from jobs.generate import build_parser

from .jobutil import BIN, ROOT

K8S_VERSION = "1.33.0"
INFRA = os.path.join(ROOT, "infra")
IMAGE_ROOT = "/home/ray/ivmix/"


def docs(name):
    with open(os.path.join(INFRA, "k8s", name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def all_docs():
    return [d for n in sorted(os.listdir(os.path.join(INFRA, "k8s"))) for d in docs(n)]


def pins():
    with open(os.path.join(ROOT, ".ci", "constraints.txt")) as f:
        return dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def dockerfile_args():
    with open(os.path.join(INFRA, "Dockerfile")) as f:
        return dict(re.findall(r"^ARG (\w+)=(\S+)", f.read(), re.M))


# A hand transcription, not the CRD: the fields of KubeRay's ray.io/v1 RayCluster / RayJob (v1.4.2) that these manifests
# use, with the types and enums the published CRD gives them (the CRD files are ~1 MB of generated YAML that no package
# registry serves, so they are not vendored). It catches misspelt or misplaced fields (additionalProperties: false) and
# wrong types (rayStartParams values are strings in the CRD); it cannot catch a field KubeRay dropped or renamed. The
# full check is `kubectl apply --dry-run=server -f infra/k8s/` on a cluster with the operator (infra/README.md).
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = {"type": "object", "required": ["spec"]}
RAY_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "idleTimeoutSeconds": {"type": "integer"}}},
        "headGroupSpec": {"type": "object", "additionalProperties": False, "required": ["template"], "properties": {
            "serviceType": {"type": "string"}, "rayStartParams": STR_MAP, "template": POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["groupName", "template"], "properties": {
                "groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
                "rayStartParams": STR_MAP, "template": POD_TEMPLATE}}},
    },
}
KUBERAY = {
    "RayCluster": RAY_CLUSTER_SPEC,
    "RayJob": {
        "type": "object", "additionalProperties": False, "required": ["entrypoint"],
        "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
        "properties": {
            "entrypoint": {"type": "string"}, "clusterSelector": STR_MAP, "rayClusterSpec": RAY_CLUSTER_SPEC,
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
            "entrypointNumCpus": {"type": "number"}, "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
            "backoffLimit": {"type": "integer", "minimum": 0}, "submitterPodTemplate": POD_TEMPLATE,
            "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer"},
            "runtimeEnvYAML": {"type": "string"}},
    },
}


def pod_templates(doc):
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        yield spec["headGroupSpec"]["template"]
        for g in spec["workerGroupSpecs"]:
            yield g["template"]
    elif doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield spec["submitterPodTemplate"]


def test_core_objects_validate_against_kubernetes_schemas():
    kinds = []
    for doc in all_docs():
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "CronJob", "PersistentVolumeClaim", "Secret", "Secret"]


def test_kuberay_objects_use_only_crd_fields_and_valid_pod_templates():
    seen = []
    for doc in all_docs():
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        assert doc["apiVersion"] == "ray.io/v1"
        jsonschema.validate(doc["spec"], KUBERAY[doc["kind"]])
        for template in pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        seen.append(doc["kind"])
    assert sorted(seen) == ["RayCluster", "RayJob"]


def test_kuberay_schema_catches_the_classic_mistakes():
    cluster = docs("raycluster.yaml")[0]["spec"]
    bad = {**cluster, "workerGroupSpecs": [{**cluster["workerGroupSpecs"][0], "rayStartParams": {"num-gpus": 1}}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAY_CLUSTER_SPEC)  # an int where the CRD wants a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cluster, "headGroupSpecs": cluster["headGroupSpec"]}, RAY_CLUSTER_SPEC)


def test_gpu_workers_fit_one_24gb_gpu_node():
    cluster = docs("raycluster.yaml")[0]["spec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    (group,) = cluster["workerGroupSpecs"]
    spec = group["template"]["spec"]
    res = spec["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-GeForce-RTX-4090"
    gib = lambda q: float(q[:-2]) if q.endswith("Gi") else float(q) / 2**30  # noqa: E731
    assert gib(res["limits"]["memory"]) <= 32 and gib(res["requests"]["memory"]) >= 16
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and cluster["enableInTreeAutoscaling"]
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/models", "/dev/shm"} <= mounts
    for doc in all_docs():  # secrets come from Secret objects, never literals in pod specs
        for template in pod_templates(doc):
            for c in template["spec"]["containers"]:
                for e in c.get("env", []):
                    assert not re.search("SECRET|TOKEN|PASSWORD", e["name"]) or "valueFrom" in e


def _job_args(argv: list[str]) -> argparse.Namespace:
    """Parse a `python .../jobs/generate.py ...` command with the job's own parser, configs read from this checkout."""
    i = next(k for k, a in enumerate(argv) if a.endswith("jobs/generate.py"))
    args = build_parser().parse_args(argv[i + 1 :])
    if args.config:
        args.config = os.path.join(ROOT, args.config.removeprefix(IMAGE_ROOT))
    job_config.load(args)  # the config file exists and validates
    return args


def test_manifest_command_lines_parse_with_the_jobs_parser():
    rayjob = docs("rayjob.yaml")[0]
    args = _job_args(shlex.split(rayjob["spec"]["entrypoint"]))
    assert args.manifest.startswith("s3://") and args.output.startswith("s3://")
    with open(os.path.join(INFRA, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    cmd = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in compose["services"]["submit"]["command"]]
    _job_args(cmd[cmd.index("--") + 1 :])
    cron = docs("nightly-cronjob.yaml")[0]
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [IMAGE_ROOT + "infra/nightly.sh"]


def test_nightly_script_builds_a_valid_dated_command(tmp_path):
    """Run infra/nightly.sh with stand-ins that record the submission (`ray`) and report no earlier attempt
    (`python`, which the script uses for the status query), then parse the recorded command."""
    stubs = {"ray": f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n", "python": "#!/bin/sh\ncat > /dev/null\n"}
    (tmp_path / "bin").mkdir()
    for name, body in stubs.items():
        fake = tmp_path / "bin" / name
        fake.write_text(body)
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "RAY_ADDRESS": "http://head:8265",
           "MANIFEST": "s3://b/m.parquet", "OUTPUT_ROOT": "s3://b/runs/nightly/", "RUN_DATE": "2026-11-24"}
    r = subprocess.run([os.path.join(INFRA, "nightly.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "args").read_text().split()
    assert argv[argv.index("--submission-id") + 1] == "nightly-2026-11-24-0"
    args = _job_args(argv[argv.index("--") + 1 :])
    assert args.output == "s3://b/runs/nightly/2026-11-24" and args.run_name == "nightly-2026-11-24"
    env.pop("MANIFEST")
    r = subprocess.run([os.path.join(INFRA, "nightly.sh")], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "MANIFEST" in r.stderr


def test_versions_agree_with_the_project_pins():
    p, args, meta = pins(), dockerfile_args(), pyproject()
    version = meta["project"]["version"]
    assert args["RAY_VERSION"] == p["ray"] and args["TORCH_VERSION"] == p["torch"]
    assert args["PYTHON_TAG"] == "py311" and f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11"
    assert re.search(r"ray\[[^\]]*\]>=2\.51", " ".join(meta["project"]["dependencies"]))
    for doc in all_docs():
        if doc["kind"] == "RayCluster":
            assert doc["spec"]["rayVersion"] == p["ray"]
        for template in pod_templates(doc):
            for c in template["spec"]["containers"]:
                assert c["image"].endswith(f"/ivmix:{version}")
    cron = docs("nightly-cronjob.yaml")[0]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"].endswith(f"/ivmix:{version}")
    with open(os.path.join(INFRA, "compose.yaml")) as f:
        assert f"ivmix:{version}" in f.read()


@pytest.mark.heavy
def test_compose_validates_and_every_variable_is_documented():
    r = subprocess.run([os.path.join(BIN, "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                        os.path.join(INFRA, "compose.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(INFRA, "compose.yaml")) as f:
        used = set(re.findall(r"(?<!\$)\$\{(\w+)", f.read()))
    with open(os.path.join(INFRA, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(INFRA, "compose.env.example")) as f:
        example = {line.split("=")[0] for line in f if "=" in line and not line.startswith("#")}
    assert used and not [v for v in used if f"`{v}`" not in readme]
    assert used <= example


@pytest.mark.heavy
def test_dockerfile_lints_clean():
    r = subprocess.run([os.path.join(BIN, "hadolint"), os.path.join(INFRA, "Dockerfile")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(INFRA, "Dockerfile")) as f:
        text = f.read()
    assert re.search(r"^USER 1000", text, re.M) and "HEALTHCHECK" in text and "pipelines.sample --help" in text
    assert "from_pretrained" not in text and "HF_HOME=/models/hf" in text
