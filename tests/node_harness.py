"""Run ``ct-ai-node serve`` as a real process for the integration tests, and look
into its database (the same SQLite files the node uses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ct_ai_node.jobqueue import FINAL_STATES, SqliteJobQueue
from ct_ai_node.peers import dcmtk_tool, nodelay_env, wait_for_port

REPO = Path(__file__).resolve().parent.parent
SAMPLE_COVID = REPO / "sample_series" / "covid_like"


def dcmtk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run DCMTK's ``args[0]`` (not pynetdicom's app of the same name, see ``dcmtk_tool``)."""
    cmd = [dcmtk_tool(args[0]) or args[0], *args[1:]]
    return subprocess.run(cmd, env=nodelay_env(), capture_output=True, text=True, timeout=timeout)


class NodeProcess:
    """``ct-ai-node serve --config FILE`` in ``workdir`` (relative storage lands there)."""

    def __init__(self, workdir: Path, config: dict | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if isinstance(config, dict):
            self.config_path = self.workdir / "node.yaml"
            self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            self.port = int(config.get("node", {}).get("port", 11112))
            root = Path(config.get("storage", {}).get("root", "./var"))
        else:
            self.config_path = Path(config)
            data = yaml.safe_load(self.config_path.read_text())
            self.port = int(data.get("node", {}).get("port", 11112))
            root = Path(data.get("storage", {}).get("root", "./var"))
        self.root = root if root.is_absolute() else self.workdir / root
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "node.log"

    def start(self, timeout_s: float = 60) -> "NodeProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ct_ai_node", "serve", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=log, stderr=log, env=nodelay_env(), start_new_session=True)
        log.close()
        wait_for_port(self.port, timeout_s, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL the node process; its workers die with it (PDEATHSIG)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(self.proc):
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # anything left of the group
            except ProcessLookupError:
                pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def queue(self):
        """The node's queue: its SQLite file, or the PostgreSQL database its config names."""
        data = yaml.safe_load(self.config_path.read_text())
        url = (data.get("queue") or {}).get("url")
        if url:
            from ct_ai_node.jobqueue.postgres import PostgresJobQueue

            return PostgresJobQueue(url, reconnect_s=60)
        return SqliteJobQueue(self.root / "node.db")

    def jobs(self, kind: str | None = None):
        q = self.queue()
        try:
            return q.list(kind=kind, limit=1000)
        finally:
            q.close()

    def wait_jobs(self, kind: str, n: int = 1, timeout_s: float = 240, final: bool = True):
        deadline = time.monotonic() + timeout_s
        jobs = []
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            jobs = self.jobs(kind) if (self.root / "node.db").exists() or self._shared_queue() else []
            if len(jobs) >= n and (not final or all(j.state in FINAL_STATES for j in jobs)):
                return jobs
            time.sleep(0.3)
        raise AssertionError(f"timeout waiting for {n} {kind} job(s); have {jobs}\n{self.log()[-3000:]}")

    def _shared_queue(self) -> bool:
        return bool((yaml.safe_load(self.config_path.read_text()).get("queue") or {}).get("url"))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class WorkerProcess(NodeProcess):
    """``ct-ai-node worker --config FILE`` in ``workdir``: a worker host of its own."""

    def start(self, timeout_s: float = 60) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ct_ai_node", "worker", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=log, stderr=log, env=nodelay_env(), start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while "worker(s) started" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start ({self.proc.poll()}):\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def kill(self) -> None:
        """SIGKILL the whole worker host: the pool process and its worker processes."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def _group_alive(proc) -> bool:
    if proc is None:
        return False
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    # zombies of the group count as gone
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    return any(s and not s.startswith("Z") for s in out.split())


def node_config(port: int, destinations: list[dict], rules: list[dict], **sections) -> dict:
    config = {
        "node": {"ae_title": "CTAI", "host": "127.0.0.1", "port": port},
        "allowed_callers": [],
        "storage": {"root": "./var", "min_free_mb": 100},
        "completeness": {"quiet_time_s": 3, "check_interval_s": 0.5},
        "workers": {"count": 1, "lease_s": 30, "device": "cpu"},
        "retry": {"max_attempts": 5, "backoff_initial_s": 1, "backoff_max_s": 4},
        "destinations": destinations,
        "routing": {"mode": "first", "fallback": {"action": "discard"}},
        "rules": rules,
    }
    config.update(sections)
    return config


CHEST_RULE = {
    "name": "chest-ct",
    "when": [{"tag": "Modality", "equals": "CT"}, {"instances": {"range": [20, 2000]}}],
    "action": "analyse",
    "pipeline": "radlogics",
}
