"""Notifications (webhook and e-mail) when a job ends: the pure parts, the notifier's
bookkeeping, and a running node whose delivered and not-analysed studies reach a local
HTTP receiver and a local SMTP server (aiosmtpd) without patient names."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers_dicom import write_ct_series

from ct_ai_node.config import NodeConfig
from ct_ai_node.jobqueue import JobState, SqliteJobQueue
from ct_ai_node.node.notifier import Notifier, event_of, render, send_test_message
from ct_ai_node.node.worker import Worker
from ct_ai_node.peers import StoreSCP, free_port
from ct_ai_node.spool import Spool
from node_harness import CHEST_RULE, SAMPLE_COVID, NodeProcess, dcmtk, node_config
from test_node_robustness import store_file


class Receiver:
    """A local HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self, status: int = 200):
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def smtp():
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    class Keep(Message):
        def __init__(self):
            super().__init__()
            self.messages = []

        def handle_message(self, message):
            self.messages.append(message)

    handler = Keep()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, handler
    controller.stop()


def _notifications(receiver_url: str, smtp_port: int, **extra) -> list[dict]:
    return [{"name": "ops", "kind": "webhook", "url": receiver_url, **extra},
            {"name": "mail", "kind": "email", "smtp": {"host": "127.0.0.1", "port": smtp_port},
             "sender": "ctai@example.org", "to": ["radiology@example.org"], "events": ["delivered", "not_analysed"]}]


def test_events_and_templates():
    assert render("job {job_id} {unknown} {", {"job_id": 7}) == "job 7 {unknown} {"
    assert render("{job_id} for {rule}", {"job_id": 3, "rule": "chest"}) == "3 for chest"


def test_notifier_queues_once_per_ending_and_workers_send(tmp_path, receiver, smtp):
    controller, mails = smtp
    config = NodeConfig.model_validate({
        "storage": {"root": str(tmp_path / "var"), "min_free_mb": 10, "fsync": False},
        "rules": [{"name": "chest", "when": [{"tag": "Modality", "equals": "CT"}], "action": "analyse"}],
        "notifications": _notifications(receiver.url, controller.port, template="{event_text}: {rule} {patient_name}"),
    })
    st = config.storage
    spool, queue = Spool(st.spool_dir, st.db_path, fsync=False), SqliteJobQueue(st.db_path)
    clock = [1000.0]
    queue.clock = lambda: clock[0]
    try:
        key = None
        for path in write_ct_series(tmp_path / "ct", n=2, rows=16, cols=16).paths:
            key = store_file(spool, path)
        old = queue.enqueue("analyse", {"series_key": key, "rule": "chest"}, key="old")
        queue.claim(["analyse"], "w", 60)
        queue.complete(old)  # ended before the notifier's first start: history, not news
        clock[0] = 2000.0
        notifier = Notifier(lambda: config, queue, spool, st.db_path, clock=lambda: 1500.0)
        assert notifier.tick() == []
        job = queue.enqueue("analyse", {"series_key": key, "rule": "chest"}, key="new")
        queue.claim(["analyse"], "w", 60)
        queue.mark_failed(job, "not analysed: no lungs found")
        assert event_of(queue.get(job)) == "not_analysed"
        made = notifier.tick("http://127.0.0.1:8080")
        assert len(made) == 2 and notifier.tick() == []  # seen once
        payloads = {queue.get(i).payload["notification"]: queue.get(i).payload for i in made}
        # the template named the patient: then (and only then) it is in the text
        assert payloads["ops"]["text"] == "not analysed: chest Test^Patient"
        assert "Test^Patient" not in payloads["mail"]["text"]  # the default template
        assert f"/jobs/{job}" in payloads["mail"]["text"] and "no lungs found" in payloads["mail"]["text"]

        worker = Worker(config, "w1", queue=queue, spool=spool)
        for _ in made:
            worker.run_once(kinds=("notify",))
        assert [queue.get(i).state for i in made] == [JobState.DONE, JobState.DONE]
        assert receiver.bodies[0]["event"] == "not_analysed" and receiver.bodies[0]["job_id"] == job
        deadline = time.monotonic() + 10
        while not mails.messages and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mails.messages[0]["To"] == "radiology@example.org"
        assert "not analysed" in mails.messages[0]["Subject"]

        # a requeued job that ends again notifies again
        queue.requeue(job)
        queue.claim(["analyse"], "w", 60)
        clock[0] = 2001.0
        queue.complete(job)
        again = notifier.tick()
        assert sorted(queue.get(i).payload["event"] for i in again) == ["delivered", "delivered"]
    finally:
        queue.close()
        spool.close()


def test_test_button_reports_success_and_failure(tmp_path, receiver, smtp):
    controller, mails = smtp
    config = NodeConfig.model_validate({"notifications": _notifications(receiver.url, controller.port)
                                        + [{"name": "nowhere", "kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/"}]})
    assert send_test_message(config, "ops") == (True, "webhook answered HTTP 200")
    ok, message = send_test_message(config, "mail")
    assert ok and "mail handed to 127.0.0.1" in message
    ok, message = send_test_message(config, "nowhere")
    assert not ok and "ConnectError" in message
    assert receiver.bodies[0]["event"] == "test"


def test_node_notifies_delivered_and_not_analysed_without_patient_names(tmp_path, receiver, smtp):
    controller, mails = smtp
    with StoreSCP(tmp_path / "archive").start() as archive:
        port = free_port()
        analyse = {"action": "analyse", "pipeline": "radlogics", "destinations": ["archive"]}
        config = node_config(
            port, destinations=[{"name": "archive", "kind": "dicom", "host": "127.0.0.1", "port": archive.port,
                                 "ae_title": "STORESCP"}],
            rules=[{**CHEST_RULE, "destinations": ["archive"]},
                   {"name": "small", "when": [{"tag": "Modality", "equals": "CT"}], **analyse}],
            notifications=_notifications(receiver.url, controller.port))
        small = write_ct_series(tmp_path / "small", n=5, rows=32, cols=32, description="Thorax 2.5")
        with NodeProcess(tmp_path / "node", config) as node:
            for folder in (SAMPLE_COVID, tmp_path / "small"):
                sent = dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(folder))
                assert sent.returncode == 0, sent.stderr[-1000:]
            jobs = {j.payload["rule"]: j for j in node.wait_jobs("analyse", 2, timeout_s=300)}
            assert jobs["chest-ct"].state is JobState.DONE and jobs["small"].state is JobState.FAILED
            notes = node.wait_jobs("notify", 4, timeout_s=60)
            assert all(n.state is JobState.DONE for n in notes), notes
        events = sorted(b["event"] for b in receiver.bodies)
        assert events == ["delivered", "not_analysed"]
        deadline = time.monotonic() + 10
        while len(mails.messages) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        subjects = " | ".join(sorted(m["Subject"] for m in mails.messages))
        assert len(mails.messages) == 2 and "not analysed" in subjects and "results delivered" in subjects
        delivered = next(b for b in receiver.bodies if b["event"] == "delivered")
        assert "COVID-19-like" in delivered["text"] or "pneumonia" in delivered["text"]
        everything = json.dumps(receiver.bodies) + "".join(m.as_string() for m in mails.messages)
        for name in ("Phantom^CovidLike", "Phantom", "SYN-COVID", "Test^Patient"):
            assert name not in everything
