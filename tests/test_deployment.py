"""deployment/: the container image and the compose stack. Docker cannot run here, so the
compose file is parsed and checked (services, volumes, the commands it runs, the variables
it needs), and the configurations it mounts run for real without Docker: the ingress node
and a worker host from deployment/compose/*.yaml (host names pointed at loopback) on the
suite's PostgreSQL, with a real Orthanc as the PACS and its /changes feed as the source."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ct_ai_node.config import load_config
from ct_ai_node.peers import Orthanc, dcmtk_tool, free_port
from ct_ai_node.web.auth import hash_password, new_token

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deployment"
COMPOSE = DEPLOY / "docker-compose.yml"
NODE_SERVICES = ("ingress", "worker-1", "worker-2", "worker-gpu")
DATA = "/var/lib/ct-ai-node"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to deployment/) of a service's volumes."""
    out = {}
    for entry in service.get("volumes", []):
        host, container, *_ = entry.split(":")
        out[container] = host
    return out


def _env(tmp_path: Path) -> dict[str, str]:
    token, token_hash = new_token()
    return {"CTAI_DB_PASSWORD": "secret", "CTAI_ADMIN_PASSWORD_HASH": hash_password("admin-pw-1"),
            "CTAI_WORKER_TOKEN": token, "CTAI_WORKER_TOKEN_HASH": token_hash, "CTAI_LANE": "worker-1"}


def test_compose_services_volumes_commands_and_variables():
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "orthanc", "ingress", "worker-1", "worker-2"} <= set(services)
    assert services["ohif"]["profiles"] == ["viewer"] and services["worker-gpu"]["profiles"] == ["gpu"]
    # the node services run this repository's image, and the commands the tests run
    for name in NODE_SERVICES:
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deployment/Dockerfile"
        assert (DEPLOY / svc["build"]["context"]).resolve() == REPO
        sub, flag, path = svc["command"]
        assert (sub, flag, path) == ("serve" if name == "ingress" else "worker", "--config", "/etc/ct-ai-node/node.yaml")
        mounts = _mounts(svc)
        assert (DEPLOY / mounts[path]).is_file(), mounts[path]
        assert mounts[DATA].endswith("-data") and mounts[DATA] in compose["volumes"]
    # nothing shared between the ingress node and the workers but the database and HTTP
    data = [_mounts(services[n])[DATA] for n in NODE_SERVICES]
    assert len(set(data)) == len(data)
    assert services["worker-gpu"]["build"]["args"]["TORCH_INDEX"].endswith("/cu128")
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # every variable the stack needs is in .env.example; patient data stays on loopback
    needed = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE.read_text()))
    example = dict(line.split("=", 1) for line in (DEPLOY / "compose" / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert needed == set(example) - {"ORTHANC_TAG"}, (needed, set(example))
    for published in services["ingress"]["ports"] + services["orthanc"]["ports"] + services["ohif"]["ports"]:
        if not published.startswith("127.0.0.1:"):
            assert published.split(":")[0] in ("11112", "4242"), published  # DICOM only
    # each config refers only to variables the service sets
    for name in NODE_SERVICES:
        svc = services[name]
        text = (DEPLOY / _mounts(svc)["/etc/ct-ai-node/node.yaml"]).read_text()
        for var in set(re.findall(r"\$\{([A-Z_]+)\}", text)):
            assert var in svc["environment"], (name, var)
    ohif = _mounts(services["ohif"])
    assert (DEPLOY / ohif["/usr/share/nginx/html/app-config.js"]).resolve() == DEPLOY / "ohif" / "app-config.js"
    assert (DEPLOY / ohif["/etc/nginx/conf.d/default.conf"]).is_file()


def test_dockerfile_copies_what_exists_and_runs_the_cli():
    text = (DEPLOY / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (.+) \S+$", text, re.M)
    sources = [s for line in copied for s in line.split()]
    assert sources == ["pyproject.toml", "README.md", "ct_ai_node"]
    for source in sources:
        assert (REPO / source).exists()
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and {f"!{s}" for s in ("pyproject.toml", "README.md", "ct_ai_node/")} <= set(ignore)
    assert 'ENTRYPOINT ["ct-ai-node"]' in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    # the commands the image and the compose file run exist, with the options they pass
    for sub in ("serve", "worker"):
        out = subprocess.run([sys.executable, "-m", "ct_ai_node", sub, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--config" in out.stdout


def test_compose_configs_pass_check_config(tmp_path):
    env = {**os.environ, **_env(tmp_path)}
    for name in ("ingress.yaml", "worker.yaml"):
        out = subprocess.run([sys.executable, "-m", "ct_ai_node", "check-config", str(DEPLOY / "compose" / name)],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr
    # without the secrets the node says which are missing, one line each
    bare = {k: v for k, v in os.environ.items() if not k.startswith("CTAI_")}
    out = subprocess.run([sys.executable, "-m", "ct_ai_node", "check-config", str(DEPLOY / "compose" / "worker.yaml")],
                         capture_output=True, text=True, env=bare)
    assert out.returncode == 2
    assert "workers.fetch_token: environment variable CTAI_WORKER_TOKEN is not set" in out.stdout + out.stderr


def _on_loopback(text: str, pg_url: str, orthanc: Orthanc, node_port: int, web_port: int, root: Path) -> str:
    """A compose configuration with its service names pointed at this machine's peers."""
    return (text.replace("postgresql://ctai@postgres:5432/ctai", pg_url)
            .replace("http://orthanc:8042", orthanc.url)
            .replace("http://ingress:8080", f"http://127.0.0.1:{web_port}")
            .replace("host: 0.0.0.0, port: 11112", f"host: 127.0.0.1, port: {node_port}")
            .replace("host: 0.0.0.0\n  port: 8080", f"host: 127.0.0.1\n  port: {web_port}")
            .replace(DATA, str(root)))


@pytest.mark.slow
@pytest.mark.skipif(not (dcmtk_tool("storescu") and (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists())),
                    reason="DCMTK or Orthanc not installed (make test installs them)")
def test_compose_configs_run_ingress_and_worker_for_real(tmp_path, pg_url):
    """The mounted configurations as they are (only host names and ports changed): a study
    stored into Orthanc reaches the ingress node by the feed, a worker host fetches it with
    its token and sends the results into the same study."""
    from node_harness import SAMPLE_COVID, NodeProcess, WorkerProcess
    from test_orthanc_feed import _store_into_orthanc, _wait_results
    from test_scale_out import _new_study

    env = _env(tmp_path)
    os.environ.update(env)  # the node processes inherit it, as containers get theirs
    try:
        with Orthanc(tmp_path / "orthanc", extra_config={"StableAge": 1}).start() as orthanc:
            node_port, web_port = free_port(), free_port()
            configs = {}
            for name in ("ingress", "worker"):
                text = _on_loopback((DEPLOY / "compose" / f"{name}.yaml").read_text(), pg_url, orthanc, node_port,
                                    web_port, tmp_path / name / "var")
                configs[name] = yaml.safe_load(text)
                (tmp_path / f"{name}.yaml").write_text(text)
                load_config(tmp_path / f"{name}.yaml")  # still a valid configuration
            assert configs["ingress"]["web"]["users"] and configs["worker"]["workers"]["fetch_token"]
            study = _new_study(SAMPLE_COVID, tmp_path / "study")
            ingress = NodeProcess(tmp_path / "ingress", tmp_path / "ingress.yaml")
            ingress.root = tmp_path / "ingress" / "var"
            with ingress:
                worker = WorkerProcess(tmp_path / "worker", configs["worker"]).start()
                try:
                    deadline = time.monotonic() + 30
                    while "starting at change" not in ingress.log() and time.monotonic() < deadline:
                        time.sleep(0.2)
                    _store_into_orthanc(orthanc, tmp_path / "study")
                    held = _wait_results(orthanc, study, timeout_s=300)
                    jobs = ingress.wait_jobs("analyse", 1)
                finally:
                    worker.stop()
            assert held["CT"] == 56 and held["SEG"] == 2  # the lung + infection SEG and the lobe SEG
            assert [j.state.value for j in jobs] == ["done"]
            assert "fetched from http://127.0.0.1" in worker.log()
    finally:
        for key in env:
            os.environ.pop(key, None)
