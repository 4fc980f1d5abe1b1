"""Issue 14's deployment files agree with what ``ainode`` reads: the Helm chart (rendered with its
default values by ``helm template`` where installed, else by the small renderer below, which
knows only the template constructs the chart uses and refuses any other), the compose file and
the systemd units. No Docker engine or cluster runs here, so the files are parsed and compared:
configuration valid, ports, queues, environment variables, mounts, and every command line a
valid ``ainode`` command.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.cli import build_parser
from node.jobs.distributed import BROKER_ENV
from node.settings import load_settings
from node.settings.config import Settings

from .peers import ROOT

DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "ainode"
CONFIG_PATH = "/etc/ainode/ainode.yaml"
_EXPR = re.compile(r"(\s*){{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _lookup(path: str, scope: dict[str, Any]) -> Any:
    value: Any = scope
    for part in path.lstrip(".").split("."):
        value = value[part]
    return value


def _evaluate(expr: str, scope: dict[str, Any]) -> str:
    """``.A.B``, ``.A.B | quote``, ``toYaml .A.B | nindent N``: nothing else."""
    if m := re.fullmatch(r"toYaml (\.[\w.]+) \| nindent (\d+)", expr):
        text = yaml.safe_dump(_lookup(m[1], scope), sort_keys=False).rstrip("\n")
        pad = " " * int(m[2])
        return "\n" + "\n".join(pad + line for line in text.splitlines())
    if m := re.fullmatch(r"(\.[\w.]+)(?: \| (quote))?", expr):
        value = _lookup(m[1], scope)
        return f'"{value}"' if m[2] else str(value)
    raise AssertionError(f"template construct the test's renderer does not know: {{{{ {expr} }}}}")


def _render_chart() -> list[dict[str, Any]]:
    """Every manifest of the chart with its default values."""
    if shutil.which("helm"):
        out = subprocess.run(["helm", "template", "ainode", str(CHART)], capture_output=True, text=True, check=True)
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    scope = {"Values": yaml.safe_load((CHART / "values.yaml").read_text()), "Release": {"Name": "ainode"},
             "Chart": {"Name": chart["name"], "Version": chart["version"]}}  # fmt: skip
    docs = []
    for template in sorted((CHART / "templates").glob("*.yaml")):

        def substitute(m: re.Match[str]) -> str:
            space, trim_left, expr, _trim_right = m.groups()
            return ("" if trim_left else space) + _evaluate(expr, scope)

        docs += [d for d in yaml.safe_load_all(_EXPR.sub(substitute, template.read_text())) if d]
    return docs


def _settings(data: dict[str, Any], tmp_path: Path) -> Settings:
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_settings(path)  # validated as `ainode config check` does


def _ainode_args(command: list[str]) -> Any:
    """The parsed ``ainode`` command line (fails the test when ainode would refuse it)."""
    assert command[0].endswith("ainode"), command
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"not an ainode command line: {shlex.join(command)}")


def _commands(container: dict[str, Any]) -> list[list[str]]:
    probes = [container.get(p, {}).get("exec", {}).get("command") for p in ("readinessProbe", "livenessProbe")]
    return [c for c in [container["command"], *probes] if c]


def test_the_helm_chart_matches_what_ainode_reads(tmp_path):
    docs = _render_chart()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("ConfigMap", "ainode-config"), ("Deployment", "ainode-gpu-worker"), ("Deployment", "ainode-receiver"),
        ("Deployment", "ainode-worker"), ("PersistentVolumeClaim", "ainode-data"), ("Service", "ainode-dicom"),
    ]  # fmt: skip
    by_name = {d["metadata"]["name"]: d for d in docs}
    settings = _settings(yaml.safe_load(by_name["ainode-config"]["data"]["ainode.yaml"]), tmp_path)
    assert settings.node.executor == "celery" and settings.storage.database_url
    secret_env = {settings.keys.variable, BROKER_ENV, "PGPASSWORD"}  # PGPASSWORD: libpq, for the database_url
    consumed: set[str] = set()
    for name in ("ainode-receiver", "ainode-worker", "ainode-gpu-worker"):
        pod = by_name[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        for command in _commands(container) + [c["command"] for c in pod.get("initContainers", [])]:
            args = _ainode_args(command)
            assert args.config == CONFIG_PATH
        env = {e["name"] for e in container["env"]}
        assert secret_env <= env, (name, secret_env - env)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["data"] == str(settings.node.data_dir) and CONFIG_PATH.startswith(mounts["config"] + "/")
        assert "readinessProbe" in container
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "ainode-config"
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "ainode-data"
        args = _ainode_args(container["command"])
        if args.func.__name__ == "cmd_worker":
            queues = set(args.queues.split(","))
            assert queues <= set(settings.celery.queues()), (name, queues)
            consumed |= queues
        else:
            assert args.func.__name__ == "cmd_serve"
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports == {"dicom": settings.node.port, "console": settings.console.port}
            probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
            assert probes == {"readinessProbe": {"path": "/readyz", "port": "console"},
                              "livenessProbe": {"path": "/healthz", "port": "console"}}  # fmt: skip
            scrape = by_name[name]["spec"]["template"]["metadata"]["annotations"]
            assert scrape["prometheus.io/port"] == str(settings.console.port)
    assert consumed == set(settings.celery.queues())  # every stage's queue has workers
    gpu = by_name["ainode-gpu-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] >= 1 and gpu["resources"]["limits"]["nvidia.com/gpu"] >= 1
    gpu_queues = set(_ainode_args(gpu["command"]).queues.split(","))
    assert gpu_queues == set(settings.celery.analyse_queues.values())  # GPU workers only run inference
    (service_port,) = by_name["ainode-dicom"]["spec"]["ports"]
    assert service_port["targetPort"] == "dicom"


def test_the_compose_file_matches_what_ainode_reads(tmp_path):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # anchors and merge keys resolved
    services = compose["services"]
    assert {"node", "worker", "gpu-worker", "postgres", "rabbitmq", "orthanc"} <= set(services)
    config_file = next(
        DEPLOY / v.split(":")[0] for v in services["node"]["volumes"] if v.split(":")[1] == CONFIG_PATH
    )  # fmt: skip
    settings = _settings(yaml.safe_load(config_file.read_text()), tmp_path)
    consumed: set[str] = set()
    for name in ("node", "worker", "gpu-worker"):
        service = services[name]
        command = service["command"]
        if command[:2] == ["sh", "-c"]:  # "ainode db upgrade ... && exec ainode serve ..."
            commands = [shlex.split(part.replace("exec ", "")) for part in command[2].split("&&")]
        else:
            commands = [command]
        commands.append(service["healthcheck"]["test"][1:])
        for line in commands:
            assert _ainode_args(line).config == CONFIG_PATH
        env = set(service["environment"])
        assert {settings.keys.variable, BROKER_ENV, "PGPASSWORD"} <= env
        volumes = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert volumes[str(settings.node.data_dir)] == "ainode-data"  # one data directory for all
        args = _ainode_args(commands[-2])
        if args.func.__name__ == "cmd_worker":
            consumed |= set(args.queues.split(","))
    assert consumed == set(settings.celery.queues())
    assert services["node"]["ports"] == [f"{settings.node.port}:{settings.node.port}"]
    broker = services["node"]["environment"][BROKER_ENV]
    assert re.fullmatch(r"amqp://ainode:\$\{RABBITMQ_PASSWORD[^}]*\}@rabbitmq:5672/ainode", broker)
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_VHOST"] == "ainode"
    assert "@postgres:5432/" in (settings.storage.database_url or "")
    pacs = settings.peer("ORTHANC")
    orthanc = services["orthanc"]["environment"]
    assert (pacs.host, pacs.port, orthanc["ORTHANC__DICOM_AET"]) == ("orthanc", 4242, "ORTHANC")
    assert yaml.safe_load(orthanc["ORTHANC__DICOM_MODALITIES"])["ainode"] == [
        settings.node.ae_title, "node", settings.node.port
    ]  # fmt: skip
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


@pytest.mark.parametrize("unit", ["ainode.service", "ainode-worker@.service"])
def test_the_systemd_units_run_valid_ainode_commands(unit):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / unit)
    service = parser["Service"]
    for key in ("ExecStart", "ExecStartPre"):
        line = shlex.split(service[key].replace("%i", "gpu"))
        args = _ainode_args(line)
        assert CONFIG_PATH in (getattr(args, "config", None), getattr(args, "file", None)), line
    assert service["KillSignal"] == "SIGTERM" and service["UMask"] == "0077"
