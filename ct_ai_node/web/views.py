"""What the web app's pages and JSON API show, as plain data (dicts of str/int/float).

Reads the queue, the spool and the jobs' ``result.json`` files; never patient names or IDs:
series are named by their hashed reference (``series_ref``), jobs by rule, pipeline and
destination, results by class, probability and volumes.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import quote
from typing import Callable

from ct_ai_node.config import NodeConfig
from ct_ai_node.jobqueue import FINAL_STATES, PARENT_KINDS, Job, JobQueue
from ct_ai_node.logs import series_ref
from ct_ai_node.node.audit import AuditLog
from ct_ai_node.result import read_result, result_line

#: SOP classes whose images make the job page's preview (heat-map secondary captures)
SC_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"})

def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def job_row(job: Job, outbox: Path | None = None, summary: dict | None = None) -> dict:
    """``summary``: the result the worker kept in the database, for a job whose result.json
    is not in this host's outbox (a worker on another host analysed it)."""
    p = job.payload
    row = {"id": job.id, "kind": job.kind, "state": str(job.state), "attempts": job.attempts,
           "max_attempts": job.max_attempts, "parent": job.parent_id, "rule": p.get("rule") or "",
           "pipeline": p.get("pipeline") or "", "destination": p.get("destination") or "",
           "destinations": list(p.get("destinations") or []), "notice": bool(p.get("notice")),
           "series": series_ref(p["series_key"]) if p.get("series_key") else "",
           "rerun_of": p.get("rerun_of"), "requested_by": p.get("requested_by") or "",
           "created": _when(job.created_at), "updated": _when(job.updated_at),
           "seconds": round(job.updated_at - job.created_at, 1) if job.state in FINAL_STATES else None,
           "error": job.last_error or ""}
    if outbox is not None and job.kind == "analyse":
        row["result"] = read_result(outbox, job.id) or summary
        row["result_line"] = result_line(row["result"])
    return row


def _destination_target(dest) -> str:
    if dest.kind == "dicom":
        return f"{dest.ae_title}@{dest.host}:{dest.port}"
    return dest.url


def destinations_health(config: NodeConfig, queue: JobQueue, recent: int = 500) -> list[dict]:
    """Each destination with its latest delivery (state, when, error) and counts of the
    recent ones by state: a destination whose latest delivery is dead needs a look."""
    deliveries = queue.list(kind="deliver", limit=recent)
    out = []
    for dest in config.destinations:
        mine = [j for j in deliveries if j.payload.get("destination") == dest.name]
        counts: dict[str, int] = {}
        for j in mine:
            counts[str(j.state)] = counts.get(str(j.state), 0) + 1
        latest = mine[0] if mine else None
        health = "unused" if latest is None else {"done": "ok", "dead": "failing"}.get(str(latest.state), "busy")
        if latest is not None and latest.state.value == "queued" and latest.attempts:
            health = "retrying"
        out.append({"name": dest.name, "kind": dest.kind, "target": _destination_target(dest), "health": health,
                    "latest_state": str(latest.state) if latest else "", "latest_at": _when(latest.updated_at) if latest else "",
                    "latest_error": (latest.last_error or "") if latest else "", "recent": counts})
    return out


def dashboard(config: NodeConfig, queue: JobQueue, spool, services: Callable[[], dict], *,
              state: str | None = None, kind: str | None = None, limit: int = 50, job_log=None) -> dict:
    """Everything the dashboard shows. ``state`` / ``kind`` filter the job list; ``job_log``
    holds the results of jobs analysed on other hosts."""
    series = spool.series()
    by_state: dict[str, int] = {}
    for rec in series:
        by_state[rec.state] = by_state.get(rec.state, 0) + 1
    kinds = [kind] if kind else list(PARENT_KINDS)
    jobs: list[Job] = []
    for k in kinds:
        jobs.extend(queue.list(state=state, kind=k, limit=limit))
    jobs.sort(key=lambda j: j.id, reverse=True)
    failed = sorted((r for r in series if r.state == "failed"), key=lambda r: r.updated_at, reverse=True)
    st, ret = config.storage, config.retention
    kept = job_log.summaries(j.id for j in jobs[:limit] if j.kind == "analyse") if job_log is not None else {}
    return {
        "services": services(),
        "storage": {"free_mb": round(spool.free_mb()), "min_free_mb": st.min_free_mb,
                    "spool_used_mb": round(spool.used_bytes() / 2**20, 1), "max_spool_mb": st.max_spool_mb},
        "retention": {"enabled": ret.enabled, "delivered_grace_h": ret.delivered_grace_h,
                      "max_age_days": ret.max_age_days},
        "jobs_by_state": queue.counts(),
        "series_by_state": by_state,
        "destinations": destinations_health(config, queue),
        "rules": [{"name": r.name, "action": r.action, "pipeline": getattr(r, "pipeline", None) or "",
                   "destinations": list(r.destinations)} for r in config.rules],
        "jobs": [job_row(j, st.outbox_dir, kept.get(j.id)) for j in jobs[:limit]],
        "failed_series": [{"series": series_ref(r.key), "instances": r.instance_count, "caller": r.calling_ae,
                           "updated": _when(r.updated_at), "reason": r.reason or ""} for r in failed[:limit]],
        "filters": {"state": state or "", "kind": kind or ""},
    }


#: at most this many heat maps on a job page: the highest-scoring slices
PREVIEWS_SHOWN = 6
_SCORE = re.compile(r"slice score ([0-9.]+)")


def previews(outbox: Path, job_id: int) -> list[Path]:
    """The job's heat-map secondary captures (by the SOP classes result.json lists): the
    :data:`PREVIEWS_SHOWN` with the highest AI slice score (from their burned-in caption's
    Image Comments), in series order."""
    import pydicom

    folder = Path(outbox) / f"job-{job_id}"
    try:
        outputs = json.loads((folder / "result.json").read_text()).get("outputs") or {}
    except (OSError, ValueError):
        return []
    files = [folder / name for name, sop in sorted(outputs.items())
             if sop in SC_SOP_CLASSES and (folder / name).is_file()]
    if len(files) <= PREVIEWS_SHOWN:
        return files
    scored = []
    for i, path in enumerate(files):
        try:
            comments = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ImageComments"])
                           .get("ImageComments", ""))
        except Exception:  # noqa: BLE001 - an unreadable file is not shown
            continue
        match = _SCORE.search(comments)
        scored.append((float(match.group(1)) if match else 0.0, -i, path))
    best = sorted(scored, reverse=True)[:PREVIEWS_SHOWN]
    return [path for _, _, path in sorted(best, key=lambda t: -t[1])]


def job_page(config: NodeConfig, queue: JobQueue, audit: AuditLog, job_id: int, job_log=None) -> dict | None:
    job = queue.get(job_id)
    if job is None:
        return None
    outbox = config.storage.outbox_dir
    kept = job_log.summaries([job_id]) if job_log is not None and job.kind == "analyse" else {}
    row = job_row(job, outbox, kept.get(job_id))
    children = [job_row(c) for c in queue.children(job_id)]
    reruns = []
    if job.kind in PARENT_KINDS and job.payload.get("series_key"):
        reruns = [j.id for j in queue.for_series([job.payload["series_key"]], kinds=(job.kind,))
                  if j.payload.get("rerun_of") == job_id]
    study = (row.get("result") or {}).get("study_instance_uid")
    viewer = config.web.viewer_url if config.web is not None else None
    link = viewer.replace("{study}", quote(study, safe="")) if viewer and study else None
    return {"job": row, "deliveries": children, "reruns": reruns, "viewer_link": link,
            "log": job_log.lines(job_id) if job_log is not None else [],
            "previews": len(previews(outbox, job_id)) if job.kind == "analyse" else 0,
            "audit": [e.as_dict() for e in audit.entries(job_id=job_id, limit=50)]}


def recent_series(spool, limit: int = 50) -> list[dict]:
    """Received series for the rule tester's choice: reference, modality, caller, count, state."""
    records = sorted(spool.series(), key=lambda r: r.last_received_at, reverse=True)[:limit]
    return [{"ref": series_ref(r.key), "modality": r.modality, "caller": r.calling_ae, "instances": r.instance_count,
             "state": r.state, "received": _when(r.last_received_at)} for r in records]


def action_line(action) -> str:
    from ct_ai_node.rules.routing import describe_action

    return f"{action.rule}: {describe_action(action)}"


def decision_lines(decision) -> list[str]:
    """The rule tester's answer: what would happen, then why (check-config's wording)."""
    return [f"=> {action_line(a)}" for a in decision.actions] + list(decision.explanation)
