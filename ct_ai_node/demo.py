"""``ct-ai-node demo``: the whole node on an embedded default, nothing to set up.

Starts a stand-in PACS on loopback (by default a second Storage SCP of our own;
``--pacs orthanc`` a real Orthanc), starts the node with the embedded default
configuration (every CT series analysed, results to that PACS), sends the bundled
sample series over C-STORE, waits until the results are acknowledged by the PACS
and prints what happened, with timings and where to look.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ct_ai_node.config import default_config
from ct_ai_node.peers import free_port

SAMPLE_SERIES = Path(__file__).resolve().parent.parent / "sample_series" / "covid_like"
PACS_AE = "DEMOPACS"
SENDER_AE = "DEMOSCU"


@dataclass
class DemoReport:
    workdir: Path
    pacs: str
    pacs_where: str
    job_state: str = ""
    job_error: str | None = None
    instances_sent: int = 0
    send_s: float = 0.0
    results_s: float = 0.0  # last instance sent -> results acknowledged by the PACS
    objects_at_pacs: int = 0
    result: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.job_state == "done" and self.objects_at_pacs > 0


class _BuiltinPacs:
    """Our own Storage SCP writing into a folder: the PACS of the demo."""

    def __init__(self, folder: Path):
        from ct_ai_node.ingress import ScpSettings, StorageSCP
        from ct_ai_node.spool import Spool

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.spool = Spool(folder / "received", folder / "index.db")
        self.scp = StorageSCP(ScpSettings(ae_title=PACS_AE, host="127.0.0.1", port=0, min_free_mb=50),
                              self.spool).start()
        self.port, self.ae_title, self.where = self.scp.port, PACS_AE, str(folder / "received")

    def count(self) -> int:
        return sum(r.instance_count for r in self.spool.series())

    def close(self) -> None:
        self.scp.stop()
        self.spool.close()


class _OrthancPacs:
    def __init__(self, folder: Path):
        from ct_ai_node.peers import Orthanc

        self.orthanc = Orthanc(folder).start()
        self.port, self.ae_title = self.orthanc.dicom_port, self.orthanc.ae_title
        self.where = (f"Orthanc database {folder / 'db'} (to browse it: Orthanc {folder / 'orthanc.json'}, "
                      f"then {self.orthanc.url}/app/explorer.html)")

    def count(self) -> int:
        import httpx

        return len(httpx.get(f"{self.orthanc.url}/instances", timeout=10).json())

    def close(self) -> None:
        self.orthanc.close()


def run_demo(pacs: str = "builtin", series: Path = SAMPLE_SERIES, workdir: Path | None = None,
             timeout_s: float = 900.0, say=print, log_level: int = logging.WARNING) -> DemoReport:
    from ct_ai_node.egress import DicomDestination
    from ct_ai_node.node import Node

    work = Path(workdir or tempfile.mkdtemp(prefix="ctai-demo-"))
    files = sorted(p for p in Path(series).rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ""))
    if not files:
        raise FileNotFoundError(f"no DICOM files in {series}")
    for old in ("node", "pacs", "orthanc"):  # a previous demo in the same folder: start afresh
        shutil.rmtree(work / old, ignore_errors=True)
    peer = _OrthancPacs(work / "orthanc") if pacs == "orthanc" else _BuiltinPacs(work / "pacs")
    report = DemoReport(work, pacs, peer.where)
    say(f"PACS ({pacs}) listening as {peer.ae_title} on 127.0.0.1:{peer.port}")
    config = default_config(
        node={"ae_title": "CTAI", "host": "127.0.0.1", "port": free_port()},
        storage={"root": str(work / "node"), "min_free_mb": 100},
        completeness={"quiet_time_s": 5, "check_interval_s": 0.5},
        destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": peer.port,
                       "ae_title": peer.ae_title}],
    ).resolved()
    node = Node(config, log_level=log_level).start()
    try:
        say(f"node listening as CTAI on 127.0.0.1:{node.port}; work folder {work}")
        t0 = time.perf_counter()
        sent = DicomDestination("node", "127.0.0.1", node.port, "CTAI", calling_ae_title=SENDER_AE).send(files)
        t_sent = time.perf_counter()
        report.instances_sent, report.send_s = sent.total, t_sent - t0
        say(f"sent {sent.total} instances of {Path(series).name} over C-STORE in {report.send_s:.2f} s; "
            f"waiting for the analysis and the results")
        job = _wait_for_job(node, timeout_s)
        report.results_s = time.perf_counter() - t_sent
        report.job_state, report.job_error = str(job.state) if job else "timeout", job.last_error if job else None
        report.objects_at_pacs = peer.count()
        if job is not None:
            result_path = config.storage.outbox_dir / f"job-{job.id}" / "result.json"
            if result_path.is_file():
                report.result = json.loads(result_path.read_text())
                report.result["path"] = str(result_path)
    finally:
        node.stop()
        peer.close()
    return report


def _wait_for_job(node, timeout_s: float):
    from ct_ai_node.jobqueue import FINAL_STATES

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = [j for j in node.queue.list(limit=50) if j.kind == "analyse"]
        if jobs and all(j.state in FINAL_STATES for j in jobs):
            return jobs[0]
        time.sleep(0.25)
    return None


def summary_lines(r: DemoReport) -> list[str]:
    res = r.result
    lines = [f"job: {r.job_state}" + (f" ({r.job_error})" if r.job_error else "")]
    if res.get("status") == "done":
        lines += [
            f"result: {res.get('case_class_text') or res.get('label')}, P(COVID-19-like) {res.get('probability'):.3f}, "
            f"{len(res.get('positive_slices') or [])} positive slices",
            f"lungs {res.get('lung_volume_ml', 0):.0f} ml, infection {res.get('lesion_volume_ml', 0):.1f} ml "
            f"({res.get('involvement_percent', 0):.1f} %), Corona score {res.get('corona_score_ml', 0):.1f}",
        ]
        if res.get("ct_severity_score") is not None:
            grades = ", ".join(f"{lobe['name'].replace('_', ' ')} {lobe['severity']}" for lobe in res.get("lobes", []))
            lines.append(f"CT severity score {res['ct_severity_score']}/25 ({grades})")
        category = res.get("category_suggestion")
        if category:
            lines.append(f"AI suggestion for the radiologist: CO-RADS {category['co_rads']}, RSNA {category['rsna']}")
    lines += [
        f"sent {r.instances_sent} instances in {r.send_s:.2f} s; results acknowledged by the PACS "
        f"{r.results_s:.1f} s after the last instance (including the wait for the series to be complete)",
        f"{r.objects_at_pacs} result objects (SEGs, heat-map SCs, key images, SRs, KOS, PDF) at the PACS: "
        f"{r.pacs_where}",
    ]
    if res.get("path"):
        lines.append(f"result.json: {res['path']}")
    lines.append(f"models trained on {res.get('trained_on') or 'synthetic phantoms only'}: NOT FOR DIAGNOSTIC USE")
    return lines
