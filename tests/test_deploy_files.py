"""The cluster files (launcher config, KubeRay RayJobs, runtime_env, submit script) checked with
Ray's own validators and the project's config loader and placement check; no cluster started."""
import copy
import os
import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest
import ray
import yaml
from ray._private.runtime_env.packaging import PACKAGE_SIZE_WARNING, create_package
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv
from ray.runtime_env.runtime_env import _validate_no_local_paths

from grpo_ray.cluster.starting import ACTOR_ENV
from grpo_ray.cluster.plan import PlacementError, check_fits, plan_placement
from grpo_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SUBMIT = ROOT / "scripts" / "submit.sh"
REFERENCE = "configs/qwen2.5-3b-gsm8k.yaml"
RAYJOBS = ["rayjob.yaml", "rayjob-elastic.yaml"]

# RayJobSpec's fields (ray-operator/apis/ray/v1/rayjob_types.go, KubeRay 1.5).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
    "schedule"}
# RayClusterSpec's, WorkerGroupSpec's and AutoscalerOptions' (raycluster_types.go, KubeRay 1.5).
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
    "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy", "upgradeStrategy",
    "gcsFaultToleranceOptions", "authOptions"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "suspend",
    "numOfHosts", "rayStartParams", "template", "scaleStrategy"}
AUTOSCALER_OPTIONS_FIELDS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode", "version"}


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def train_command(argv: list[str]) -> Config:
    """`grpo-ray train --config FILE overrides...` -> the Config it would run with."""
    assert argv[:3] == ["grpo-ray", "train", "--config"], argv
    assert (ROOT / argv[3]).is_file() and argv[3].startswith("configs/"), argv[3]
    return load_config(ROOT / argv[3], argv[4:])


def fits(cfg: Config, nodes: list[dict[str, float]], engines: int | None = None) -> None:
    """The placement check of `cfg`, or of `cfg` with a fleet of `engines`."""
    if engines is not None:
        cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(
            update={"num_engines": engines})})
    check_fits(plan_placement(cfg, use_gpu=True), nodes)


def fleet_fits(cfg: Config, at_min: list[dict], at_max: list[dict]) -> None:
    """An elastic fleet: the run starts on the cluster at its minimum (the start and the min
    fleets fit there), grows to max_engines on the cluster at its maximum, and no further."""
    low, high = cfg.fleet_bounds
    assert cfg.elastic and cfg.cluster.autoscale, "an elastic example asks the autoscaler"
    fits(cfg, at_min)
    fits(cfg, at_min, engines=low)
    fits(cfg, at_max, engines=high)
    with pytest.raises(PlacementError, match="cannot place"):
        fits(cfg, at_max, engines=high + 1)  # max_engines uses the cluster's maximum


def test_every_cluster_yaml_parses():
    names = sorted(p.name for p in DEPLOY.glob("*.yaml"))
    assert names == ["ray-cluster.yaml", "rayjob-elastic.yaml", "rayjob.yaml", "runtime_env.yaml"]
    for name in names:
        docs = list(yaml.safe_load_all((DEPLOY / name).read_text()))
        assert len(docs) == 1 and isinstance(docs[0], dict), name
    for name in RAYJOBS:
        assert isinstance(yaml.safe_load(load(name)["spec"]["runtimeEnvYAML"]), dict)


# ---- ray up ------------------------------------------------------------------------------------

def test_launcher_config_passes_ray_up_validation():
    raw = load("ray-cluster.yaml")
    # what `ray up` does before it talks to the cloud: merge the provider's defaults, then check
    # the result against ray/autoscaler/ray-schema.json and the node-type invariants
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    install = " ".join(raw["setup_commands"])
    assert "grpo-ray[gpu]" in install
    for cmd in raw["head_start_ray_commands"][-1:] + raw["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token ray start" in cmd
    assert raw["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_launcher_minimum_cluster_holds_the_reference_recipe():
    raw = load("ray-cluster.yaml")
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]["resources"]
    workers = [t["resources"] for name, t in types.items() if name != raw["head_node_type"]
               for _ in range(t.get("min_workers", 0))]
    # submit.sh adds cluster.use_gpu=true; the trainer checks the nodes up at start, so the
    # workers of min_workers must be enough
    cfg = load_config(ROOT / REFERENCE, ["cluster.use_gpu=true"])
    fits(cfg, [head] + workers)
    with pytest.raises(PlacementError, match="cannot place"):
        fits(cfg, [head])  # what starting with min_workers 0 would give


def test_launcher_holds_the_elastic_fleet_it_names_from_min_to_max_workers():
    text = (DEPLOY / "ray-cluster.yaml").read_text()
    # the elastic run's submit command in its comment, continuation lines joined
    command = re.search(r"#   (scripts/submit\.sh [^\n]*max_engines[^\n]*)",
                        text.replace("\\\n#    ", ""))
    done = run_submit(*shlex.split(command.group(1))[1:], DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    entrypoint = dict(line.split(": ", 1) for line in done.stdout.splitlines())["entrypoint"]
    words = subprocess.run(["bash", "-c", "printf '%s\\0' " + entrypoint], capture_output=True,
                           text=True, check=True).stdout.split("\0")[:-1]
    cfg = train_command(words)

    raw = load("ray-cluster.yaml")
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]["resources"]
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    assert raw["max_workers"] >= sum(t["max_workers"] for t in workers.values())
    fleet_fits(cfg, [head] + [t["resources"] for t in workers.values()
                              for _ in range(t["min_workers"])],
               [head] + [t["resources"] for t in workers.values()
                         for _ in range(t["max_workers"])])


# ---- KubeRay RayJob ----------------------------------------------------------------------------

def rayjob_nodes(cluster: dict, replicas: str) -> list[dict[str, float]]:
    """The Ray nodes of a RayCluster spec: the head and each worker group's `replicas`
    (replicas, minReplicas or maxReplicas) pods."""
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    nodes = [{"CPU": float(head["resources"]["limits"]["cpu"]), "GPU": 0.0}]
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        node = {"CPU": float(res["limits"]["cpu"]), "GPU": float(res["limits"]["nvidia.com/gpu"])}
        nodes += [node] * group[replicas]
    return nodes


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_runs_the_reference_recipe_on_a_cluster_that_holds_it(name):
    job = load(name)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["shutdownAfterJobFinishes"] is True
    cfg = train_command(shlex.split(spec["entrypoint"]))
    assert cfg.model.path == "Qwen/Qwen2.5-3B-Instruct" and cfg.cluster.use_gpu is True

    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert cluster["rayVersion"] == ray.__version__
    fits(cfg, rayjob_nodes(cluster, "replicas"))
    # the driver runs on the head: the run must land on one of its volumes, not in the pod
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounts = [m["mountPath"] for m in head["volumeMounts"]]
    assert any(cfg.output.dir.startswith(m + "/") for m in mounts), cfg.output.dir


def test_elastic_rayjob_grows_its_fleet_from_min_to_max_replicas():
    spec = load("rayjob-elastic.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert set(options) <= AUTOSCALER_OPTIONS_FIELDS, set(options) - AUTOSCALER_OPTIONS_FIELDS
    assert options["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    cfg = train_command(shlex.split(spec["entrypoint"]))
    fleet_fits(cfg, rayjob_nodes(cluster, "minReplicas"), rayjob_nodes(cluster, "maxReplicas"))
    # the output differs from the fixed run's: a retry must not resume the other config's run
    assert cfg.output.dir != train_command(shlex.split(load("rayjob.yaml")["spec"]["entrypoint"])
                                           ).output.dir


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_retries_and_the_retry_resumes(name):
    spec = load(name)["spec"]
    assert spec["backoffLimit"] > 0
    # each retry runs the same entrypoint: it must resume by itself, from storage that outlives
    # the driver's pod and the Ray cluster (a PersistentVolumeClaim, not the pod's emptyDir)
    argv = shlex.split(spec["entrypoint"])
    assert "--resume" not in argv
    cfg = train_command(argv)
    assert cfg.output.save_every > 0
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"]
                 if cfg.output.dir.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert set(volume) == {"name", "persistentVolumeClaim"}, volume


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_runtime_env_is_accepted_by_ray(name):
    env = yaml.safe_load(load(name)["spec"]["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields
    runtime_env = RuntimeEnv(**env)
    # the submitter pod has no checkout: working_dir and pip must be URIs, not local paths
    _validate_no_local_paths(runtime_env)
    assert any(p.startswith("grpo-ray[gpu] @ ") for p in runtime_env["pip"]["packages"])


# ---- ray job submit ----------------------------------------------------------------------------

def test_runtime_env_is_accepted_by_ray_and_uploads_only_the_code(tmp_path):
    # the way `ray job submit --runtime-env deploy/runtime_env.yaml --working-dir .` builds it
    env = parse_runtime_env_args(runtime_env=str(DEPLOY / "runtime_env.yaml"),
                                 working_dir=str(ROOT))
    assert set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)
    assert not set(env.get("env_vars", {})) & set(ACTOR_ENV), "placement.py sets these already"

    # the package Ray would upload, without .gitignore's help (RAY_RUNTIME_ENV_IGNORE_GITIGNORE)
    pkg = tmp_path / "pkg.zip"
    create_package(str(ROOT), pkg, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(pkg).namelist()
    for wanted in ["grpo_ray/cli.py", REFERENCE, "pyproject.toml", "deploy/runtime_env.yaml"]:
        assert wanted in names
    for name in names:
        top = name.split("/")[0]
        assert top not in {".venv", ".git", "outputs", ".gpu", ".whl"}, name
        assert ".egg-info/" not in name and "__pycache__/" not in name, name
    assert pkg.stat().st_size < PACKAGE_SIZE_WARNING


def run_submit(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "SUBMISSION_ID", "CONFIG",
                                  "OUTPUT_ROOT", "DRY_RUN"))}
    return subprocess.run(["bash", str(SUBMIT), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=30)


def test_submit_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(SUBMIT)]).returncode == 0
    done = run_submit("--help")
    assert done.returncode == 0 and "RAY_AUTH_TOKEN" in done.stdout and "Usage:" in done.stdout
    done = run_submit()
    assert done.returncode == 2 and "RAY_ADDRESS" in done.stderr
    done = run_submit("http://head:8265", "not-an-override", DRY_RUN="1")
    assert done.returncode == 2 and "not-an-override" in done.stderr


def test_submit_script_submits_the_reference_recipe_with_the_overrides():
    done = run_submit("http://head:8265", "rollout.num_engines=2", "rollout.prompts_per_step=16",
                      "reward.functions=[{name: correctness, weight: 2}]",
                      DRY_RUN="1", SUBMISSION_ID="job-7")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["job id"] == "job-7"
    command = shlex.split(lines["command"])
    assert command[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    assert command[command.index("--runtime-env") + 1] == str(DEPLOY / "runtime_env.yaml")
    assert command[command.index("--working-dir") + 1] == str(ROOT)
    assert command[command.index("--submission-id") + 1] == "job-7"
    assert command[-4:-1] == ["--", "bash", "-c"] and command[-1] == lines["entrypoint"]

    # the argv the head node's bash makes of the entrypoint, $HOME expanded there
    words = subprocess.run(["bash", "-c", "printf '%s\\0' " + lines["entrypoint"]],
                           env={"HOME": "/home/head", "PATH": os.environ["PATH"]},
                           capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    cfg = train_command(words)
    assert cfg.cluster.use_gpu is True and cfg.rollout.num_engines == 2
    assert [(f.name, f.weight) for f in cfg.reward.functions] == [("correctness", 2.0)]
    assert cfg.output.dir == "/home/head/grpo-ray-runs/job-7"


def test_submit_script_lets_the_users_output_dir_win():
    done = run_submit("output.dir=/mnt/shared/run1", DRY_RUN="1", RAY_ADDRESS="http://head:8265")
    assert done.returncode == 0, done.stderr
    entrypoint = dict(line.split(": ", 1) for line in done.stdout.splitlines())["entrypoint"]
    words = subprocess.run(["bash", "-c", "printf '%s\\0' " + entrypoint], capture_output=True,
                           text=True, check=True).stdout.split("\0")[:-1]
    assert train_command(words).output.dir == "/mnt/shared/run1"
