"""`ct-ai-node jobs list | requeue`: the administrator's view of the node's queue."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from ct_ai_node.cli import app
from ct_ai_node.jobqueue import JobState, SqliteJobQueue

runner = CliRunner()


def _config(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "var")}}))
    return path


def test_list_and_requeue_a_failed_delivery(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "var").mkdir()
    q = SqliteJobQueue(tmp_path / "var" / "node.db")
    parent = q.enqueue("analyse", {"rule": "chest-ct", "series_key": "k"})
    q.claim(["analyse"], "w", 60)
    child = q.enqueue("deliver", {"destination": "pacs", "files": []}, parent_id=parent, max_attempts=1)
    q.claim(["deliver"], "w", 60)
    q.fail(child, "pacs: association rejected", retryable=False, owner="w")
    q.mark_failed(parent, "delivery failed: pacs: association rejected")

    res = runner.invoke(app, ["jobs", "list", "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert "failed 1" in res.output and "dead 1" in res.output
    assert "association rejected" in res.output and f"parent {parent}" in res.output

    res = runner.invoke(app, ["jobs", "list", "--config", str(config), "--state", "dead"])
    assert res.exit_code == 0 and "deliver" in res.output and "chest-ct" not in res.output.splitlines()[-1]

    res = runner.invoke(app, ["jobs", "requeue", str(parent), "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert q.get(child).state == JobState.QUEUED and q.get(child).attempts == 0
    assert q.get(parent).state == JobState.SENDING  # the dispatcher closes it when the delivery ends


def test_requeue_unknown_job_and_bad_state(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "var").mkdir()
    SqliteJobQueue(tmp_path / "var" / "node.db").close()
    res = runner.invoke(app, ["jobs", "requeue", "99", "--config", str(config)])
    assert res.exit_code == 2 and "no job 99" in res.output
    res = runner.invoke(app, ["jobs", "list", "--config", str(config), "--state", "lost"])
    assert res.exit_code == 2 and "not one of" in res.output


def test_no_database_yet(tmp_path):
    res = runner.invoke(app, ["jobs", "list", "--config", str(_config(tmp_path))])
    assert res.exit_code == 2 and "no job database" in res.output


def test_requeue_a_not_analysed_job_runs_the_analysis_again(tmp_path):
    """A job with only its "not analysed" notice deliveries was never analysed: requeue
    runs it again whole instead of closing it as done once the notices are sent."""
    config = _config(tmp_path)
    (tmp_path / "var").mkdir()
    q = SqliteJobQueue(tmp_path / "var" / "node.db")
    parent = q.enqueue("analyse", {"rule": "chest-ct", "series_key": "k"})
    q.claim(["analyse"], "w", 60)
    notice = q.enqueue("deliver", {"destination": "pacs", "files": [], "notice": True}, parent_id=parent)
    q.mark_failed(parent, "not analysed: only 5 slices (< 20)")

    res = runner.invoke(app, ["jobs", "requeue", str(parent), "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert q.get(parent).state == JobState.QUEUED
    assert q.get(notice).state == JobState.QUEUED  # untouched: it was never failed
