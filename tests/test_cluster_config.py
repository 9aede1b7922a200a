"""cluster.yaml: Ray's own offline validation (what `ray up` checks before contacting a cloud) plus
the project's invariants. Passes on the shipped file; each broken copy fails with its message.
No test contacts a cloud or needs credentials."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lcl_tune.cli.cluster_check import COMMAND_LISTS, main, parse_installs, validate_cluster_config

REPO = Path(__file__).resolve().parents[1]
# The pins come from pyproject.toml and its lock; Python 3.10 has no tomllib to read them (the check says so).
needs_tomllib = pytest.mark.skipif(sys.version_info < (3, 11), reason="by design: reading pyproject.toml needs tomllib (3.11)")
CLUSTER = REPO / "cluster.yaml"
PYPROJECT = REPO / "pyproject.toml"
TEXT = CLUSTER.read_text()
WORKER = "gpu_worker_a10g"


def check(path: Path) -> list[str]:
    return validate_cluster_config(path, pyproject=PYPROJECT)


def broken_text(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of cluster.yaml (comments and all) with one textual edit."""
    assert TEXT.count(old) == 1, f"{old!r} should occur once in cluster.yaml"
    path = tmp_path / "cluster.yaml"
    path.write_text(TEXT.replace(old, new))
    return path


def broken_tree(tmp_path: Path, edit) -> Path:
    """A copy of cluster.yaml edited as a tree (edit mutates the dict)."""
    tree = yaml.safe_load(TEXT)
    edit(tree)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def only(problems: list[str], *fragments: str) -> str:
    """The problem line holding every fragment; each line is 'cluster.yaml: KEY: ... Fix: ...'."""
    for line in problems:
        assert line.startswith("cluster.yaml: ") and "Fix: " in line and "\n" not in line, line
    hits = [line for line in problems if all(f in line for f in fragments)]
    assert hits, f"no problem with {fragments} in:\n" + "\n".join(problems)
    return hits[0]


# ---- the shipped file -------------------------------------------------------------------------


def test_shipped_cluster_yaml_is_valid():
    assert check(CLUSTER) == []


def test_cli_prints_valid_and_exits_0(capsys):
    assert main([str(CLUSTER), "--pyproject", str(PYPROJECT)]) == 0
    assert capsys.readouterr().out.strip() == f"{CLUSTER}: valid"


def test_module_entry_point_and_no_ray_at_import(tmp_path):
    """`python -m lcl_tune.cli.cluster_check` works; importing the module does not import Ray."""
    out = subprocess.run([sys.executable, "-m", "lcl_tune.cli.cluster_check", "cluster.yaml"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "cluster.yaml: valid", out.stdout + out.stderr
    code = "import sys, lcl_tune.cli.cluster_check; print('ray' in sys.modules)"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert light.stdout.strip() == "False", light.stderr


def test_every_key_is_commented():
    """Each key of cluster.yaml has a comment on its line or on the line right above it."""
    import re

    lines = TEXT.splitlines()
    keys = 0
    for i, line in enumerate(lines):
        if re.match(r"^\s*(- )?[A-Za-z_/][\w./-]*:(\s|$)", line):
            keys += 1
            assert "#" in line or lines[i - 1].strip().startswith("#"), f"line {i + 1} has no comment: {line}"
    assert keys > 40


def test_never_touches_the_cloud_provider(monkeypatch, tmp_path):
    """The AWS provider is looked up, never imported (that would need boto3 and credentials)."""
    from ray.autoscaler._private import providers

    def refuse(_config):
        raise AssertionError("the AWS node provider was imported")

    monkeypatch.setitem(providers._NODE_PROVIDERS, "aws", refuse)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    assert check(CLUSTER) == []


# ---- Ray's own validation --------------------------------------------------------------------


def test_typo_in_node_type_key_is_rejected_by_rays_schema(tmp_path):
    path = broken_text(tmp_path, "    max_workers: 4\n", "    max_worker: 4\n")
    only(check(path), f"available_node_types.{WORKER}.max_worker:", "unknown key", "did you mean 'max_workers'?")


def test_typo_in_top_level_key_is_rejected_by_rays_schema(tmp_path):
    path = broken_text(tmp_path, "\navailable_node_types:\n", "\navaliable_node_types:\n")
    only(check(path), "avaliable_node_types:", "unknown key", "did you mean 'available_node_types'?")


def test_typo_in_provider_key_is_caught_by_the_project_check(tmp_path):
    """Ray's schema lets any provider key through; the project check compares with the known ones."""
    path = broken_text(tmp_path, "  region: us-west-2\n", "  regoin: us-west-2\n")
    problems = check(path)
    only(problems, "provider.regoin:", "did you mean 'region'?")
    only(problems, "provider.region:", "missing")


def test_head_type_that_does_not_exist(tmp_path):
    path = broken_text(tmp_path, "head_node_type: head_cpu\n", "head_node_type: head_gpu\n")
    line = only(check(path), "head_node_type:", "'head_gpu'", "must be one of `available_node_types`")
    assert "did you mean 'head_cpu'?" in line


def test_min_workers_above_max_workers(tmp_path):
    path = broken_text(tmp_path, "    min_workers: 1\n", "    min_workers: 5\n")
    only(check(path), f"available_node_types.{WORKER}.min_workers:", "min_workers 5 > max_workers 4")


def test_sum_of_min_workers_above_global_max_workers(tmp_path):
    path = broken_text(tmp_path, "max_workers: 6\n", "max_workers: 0\n")
    only(check(path), "max_workers:", "smaller than the sum of `min_workers`", "Ray's validate_config")


def test_resources_must_be_integers_per_rays_schema(tmp_path):
    path = broken_text(tmp_path, 'resources: {"CPU": 8, "GPU": 1}', 'resources: {"CPU": 8, "GPU": "one"}')
    only(check(path), f"available_node_types.{WORKER}.resources.GPU:", "is not of type 'integer'")


def test_unknown_provider_type(tmp_path):
    path = broken_text(tmp_path, "  type: aws\n", "  type: awz\n")
    only(check(path), "provider.type:", "unknown provider type 'awz'", "did you mean 'aws'?")


def test_not_a_mapping_and_not_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    assert "not a mapping" in validate_cluster_config(tmp_path / "a.yaml")[0]
    (tmp_path / "b.yaml").write_text("cluster_name: [unclosed\n")
    assert "not valid YAML" in validate_cluster_config(tmp_path / "b.yaml")[0]


# ---- the project's invariants -----------------------------------------------------------------


@pytest.mark.parametrize("key", COMMAND_LISTS)
def test_every_command_list_must_be_set(tmp_path, key):
    path = broken_tree(tmp_path, lambda t: t.pop(key))
    only(check(path), f"{key}:", "not set", "nightly Ray")


def test_lcl_tune_version_differs_between_head_and_worker(tmp_path):
    """A worker type with its own worker_setup_commands installing another lcl-tune version."""
    def edit(tree):
        tree["available_node_types"][WORKER]["worker_setup_commands"] = tree["setup_commands"][:3] + [
            'pip install "lcl-tune==0.0.9" "ray[default,tune]==2.60.0"']
    line = only(check(broken_tree(tmp_path, edit)), f"available_node_types.{WORKER}.worker_setup_commands[3]:",
                "installs lcl-tune 0.0.9, not 0.2.0")
    assert f"{WORKER} 0.0.9" in line and "head (head_cpu) 0.2.0" in line


def test_wheel_of_another_version(tmp_path):
    path = broken_text(tmp_path, "\n    /home/ubuntu/lcl_tune/dist/lcl_tune-0.2.0-py3-none-any.whl\n",
                       "\n    /home/ubuntu/lcl_tune/dist/lcl_tune-0.3.0-py3-none-any.whl\n")
    problems = check(path)
    only(problems, "setup_commands[3]:", "installs lcl-tune 0.3.0, not 0.2.0", "rebuild the wheel")
    only(problems, "setup_commands[3]:", "no file_mounts entry puts it there")


@needs_tomllib
def test_ray_must_be_pinned_to_the_locked_version(tmp_path):
    path = broken_text(tmp_path, '"ray[default,tune]==2.60.0"', '"ray[default,tune]==2.59.0"')
    only(check(path), "setup_commands[3]:", "installs ray 2.59.0, not 2.60.0", "requirements/lock.txt")
    path = broken_text(tmp_path, '"ray[default,tune]==2.60.0"', '"ray[default,tune]"')
    only(check(path), "setup_commands[3]:", "installs ray without pinning")


@needs_tomllib
def test_a_project_without_its_lock_says_ray_is_not_compared(tmp_path, caplog):
    """A wheel install or a copied pyproject.toml has ranges only: the check says what it cannot hold the nodes to."""
    from lcl_tune.cli.cluster_check import project_pins

    (tmp_path / "pyproject.toml").write_text(PYPROJECT.read_text())
    pins = project_pins(tmp_path / "pyproject.toml")
    assert "ray" not in pins.pins and pins.version
    assert "pins no ray version (no requirements/lock.txt beside pyproject.toml)" in caplog.text
    caplog.clear()
    assert project_pins(PYPROJECT).pins["ray"] and "pins no ray" not in caplog.text


@needs_tomllib
def test_torch_pin_must_match_the_lock(tmp_path):
    path = broken_text(tmp_path, '"torch==2.13.0"', '"torch==2.12.0"')
    only(check(path), "setup_commands[3]:", "installs torch 2.12.0", "torch==2.13.0")


def test_worker_override_that_drops_the_install(tmp_path):
    """A per-type worker_setup_commands replaces setup_commands for that type (Ray's rule)."""
    path = broken_tree(tmp_path,
                       lambda t: t["available_node_types"][WORKER].update(worker_setup_commands=["nvidia-smi"]))
    only(check(path), f"available_node_types.{WORKER}:", f"no command installs lcl-tune on {WORKER}",
         "replace setup_commands")


def test_storage_must_be_a_uri(tmp_path):
    path = broken_text(tmp_path, "LCL_TUNE_STORAGE=s3://my-lcl-tune-bucket/lcl_runs",
                       "LCL_TUNE_STORAGE=/home/ubuntu/lcl_runs")
    only(check(path), "head_setup_commands[1]:",
         "LCL_TUNE_STORAGE='/home/ubuntu/lcl_runs' is not an object-storage URI",
         "s3://BUCKET/lcl_runs")


def test_tracking_must_be_an_http_server(tmp_path):
    path = broken_text(tmp_path, "LCL_TUNE_TRACKING_URI=http://$HEAD_IP:5000",
                       "LCL_TUNE_TRACKING_URI=sqlite:////home/ubuntu/mlflow/mlflow.db")
    only(check(path), "head_setup_commands[1]:", "is not an http(s):// tracking server")
    path = broken_text(tmp_path, "LCL_TUNE_TRACKING_URI=http://$HEAD_IP:5000",
                       "LCL_TUNE_TRACKING_URI=http://localhost:5000")
    only(check(path), "head_setup_commands[1]:", "loopback")


def test_settings_must_be_set(tmp_path):
    path = broken_tree(tmp_path, lambda t: t["head_setup_commands"].pop(1))
    problems = check(path)
    only(problems, "head_setup_commands:", "no command sets LCL_TUNE_STORAGE")
    only(problems, "head_setup_commands:", "no command sets LCL_TUNE_TRACKING_URI")


def test_mlflow_server_port_and_host(tmp_path):
    path = broken_text(tmp_path, "--host 0.0.0.0 --port 5000", "--host 0.0.0.0 --port 5001")
    only(check(path), "head_start_ray_commands[2]:", "port 5001", "LCL_TUNE_TRACKING_URI uses port 5000")
    path = broken_text(tmp_path, "--host 0.0.0.0 --port 5000", "--port 5000")
    only(check(path), "head_start_ray_commands[2]:", "binds 127.0.0.1", "--host 0.0.0.0")


def test_gpu_worker_type_must_declare_its_gpus(tmp_path):
    path = broken_text(tmp_path, 'resources: {"CPU": 8, "GPU": 1}', 'resources: {"CPU": 8}')
    only(check(path), f"available_node_types.{WORKER}.resources.GPU:", "does not declare its GPUs",
         '"GPU": 1')


def test_gpu_workers_are_the_types_that_declare_gpus(tmp_path):
    """No instance catalogue: a g5 machine that declares no GPU (and has no "gpu" in its name) is no GPU worker."""
    def edit(tree):
        types = tree["available_node_types"]
        for name in (WORKER, "gpu_worker_4x_a10g"):
            types[name.replace("gpu_", "")] = types.pop(name)
            types[name.replace("gpu_", "")]["resources"].pop("GPU")
    only(check(broken_tree(tmp_path, edit)), "available_node_types:", "no GPU worker type",
         "none declares resources: {GPU: n}")


def test_head_must_not_declare_gpus(tmp_path):
    path = broken_text(tmp_path, 'resources: {"CPU": 0}', 'resources: {"CPU": 0, "GPU": 1}')
    only(check(path), "available_node_types.head_cpu:", "declares GPUs", "trials go to the GPU workers")


def test_one_gpu_type_must_keep_a_node(tmp_path):
    path = broken_text(tmp_path, "    min_workers: 1\n", "    min_workers: 0\n")
    only(check(path), f"available_node_types.{WORKER}.min_workers:", "refuses a GPU study")


def test_workers_resolving_their_image_through_ssm_need_a_head_role_that_may_read_it(tmp_path):
    """The head launches the workers with its own role. Ray's default head role (ray-autoscaler-v1,
    made by Ray's aws/config.py with EC2 and S3 policies only) may not call ssm:GetParameters, so a
    worker whose ImageId is resolve:ssm:... would be refused at every launch and no GPU would join."""
    def default_head_role(tree):
        tree["available_node_types"]["head_cpu"]["node_config"].pop("IamInstanceProfile", None)

    line = only(check(broken_tree(tmp_path, default_head_role)), f"available_node_types.{WORKER}.node_config.ImageId:",
                "ssm:GetParameters", "ray-autoscaler-v1")
    assert "IamInstanceProfile" in line.split("Fix: ")[1]

    def pinned_images(tree):
        default_head_role(tree)
        for node in tree["available_node_types"].values():
            node["node_config"]["ImageId"] = "ami-0123456789abcdef0"

    assert check(broken_tree(tmp_path, pinned_images)) == []  # no SSM lookup at launch: nothing to grant


def test_search_spaces_and_configs_must_be_mounted(tmp_path):
    path = broken_tree(tmp_path, lambda t: t["file_mounts"].pop("/home/ubuntu/lcl_tune/configs"))
    only(check(path), "file_mounts:", "configs/ is not mounted")


def test_start_commands(tmp_path):
    path = broken_text(tmp_path, " --autoscaling-config=~/ray_bootstrap_config.yaml", "")
    only(check(path), "head_start_ray_commands:", "lacks --autoscaling-config")


def test_local_files(tmp_path, monkeypatch):
    """--local-files: the mounted wheel must be built (ray up reads it from the current directory)."""
    monkeypatch.chdir(tmp_path)
    problems = validate_cluster_config(CLUSTER, pyproject=PYPROJECT, local_files=True)
    only(problems, "file_mounts./home/ubuntu/lcl_tune/search_spaces:", "does not exist")
    only(problems, "dist/lcl_tune-0.2.0-py3-none-any.whl", "python -m pip wheel --no-deps -w dist .")


def test_cli_reports_problems_and_exits_1(tmp_path, capsys):
    path = broken_text(tmp_path, "head_node_type: head_cpu\n", "head_node_type: nope\n")
    assert main([str(path), "--pyproject", str(PYPROJECT)]) == 1
    out = capsys.readouterr()
    assert "head_node_type:" in out.out and "1 problem" in out.err


def test_parse_installs():
    found = parse_installs('python -m pip install -U --extra-index-url https://x "lcl-tune==0.1.0" '
                           '"ray[tune]>=2" && uv pip install --python ~/v/bin/python '
                           './dist/lcl_tune-0.1.0-py3-none-any.whl '
                           '"lcl-tune @ git+https://github.com/org/lcl_tune@v0.1.0"', "k")
    assert [(i.package, i.version) for i in found] == [
        ("lcl-tune", "0.1.0"), ("ray", None), ("lcl-tune", "0.1.0"), ("lcl-tune", "0.1.0")]


# ---- docs/cluster.md stays consistent with cluster.yaml and the pins --------------------------

DOC = (REPO / "docs" / "cluster.md").read_text()


def yaml_blocks(text: str) -> list[str]:
    import re

    return re.findall(r"```yaml\n(.*?)```", text, re.S)


def test_gcp_variant_in_docs_is_valid(tmp_path):
    """cluster.yaml with the GCP keys of the docs passes the same checks."""
    block = yaml_blocks(DOC[DOC.index("\n## GCP"):])[0]
    path = broken_tree(tmp_path, lambda t: t.update(yaml.safe_load(block)))
    assert check(path) == []
    tree = yaml.safe_load(path.read_text())
    assert tree["provider"]["type"] == "gcp" and "gs://" in " ".join(tree["head_setup_commands"])


@needs_tomllib
def test_kuberay_manifests_in_docs():
    """RayCluster / RayJob (ray.io/v1): Ray and lcl-tune versions as pinned, GPU limits, URIs."""
    from lcl_tune.cli.cluster_check import project_pins

    pins = project_pins(PYPROJECT)
    docs = {d["kind"]: d for block in yaml_blocks(DOC) for d in yaml.safe_load_all(block)
            if isinstance(d, dict) and "kind" in d}
    cluster, job = docs["RayCluster"], docs["RayJob"]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == pins.pins["ray"]
    assert f"FROM rayproject/ray:{pins.pins['ray']}-py311-gpu" in DOC
    assert f"lcl_tune-{pins.version}-py3-none-any.whl" in DOC and f"\"ray[default,tune]=={pins.pins['ray']}\"" in DOC
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    images = {c["image"] for c in head["template"]["spec"]["containers"]}
    for group in cluster["spec"]["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] >= 1 and group["maxReplicas"] >= group["minReplicas"]
        images.add(container["image"])
    assert images == {f"registry.example.com/lcl-tune:{pins.version}"}
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("lcl-tune tune /home/ray/lcl_tune/search_spaces/") and "--address auto" in entry
    assert "--storage s3://" in entry
    env = {e["name"]: e["value"] for e in head["template"]["spec"]["containers"][0]["env"]}
    tracking = env["LCL_TUNE_TRACKING_URI"]
    assert f"--tracking-uri {tracking}" in entry and tracking.endswith(":5000")
    assert docs["Service"]["spec"]["ports"][0]["port"] == 5000
    assert f"--storage {env['LCL_TUNE_STORAGE']}" in entry


@needs_tomllib
def test_anchors_are_read_and_an_alias_bomb_is_one_line(tmp_path):
    """Cluster files use anchors for what node types share: read as written. Aliases that would
    expand the file past 100,000 values (nine lines can stand for a billion) are one line."""
    anchored = tmp_path / "anchored" / "cluster.yaml"
    anchored.parent.mkdir()
    anchored.write_text(TEXT.replace("max_workers: 6", "max_workers: &most 6", 1).replace(
        "head_node_type: head_cpu", "head_node_type: head_cpu\nx_most: *most", 1))
    assert yaml.safe_load(anchored.read_text())["x_most"] == 6
    assert only(check(anchored), "x_most")  # read through: the key is Ray's schema's to refuse, not the YAML
    bomb = tmp_path / "cluster.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")))
    assert only(check(bomb), "line 5", "aliases expand it to more than 100,000 values")
