"""Benchmark (issue 15): what a radiologist waits for, the time from a chest CT's last
instance to its results acknowledged by the PACS, for the whole node on loopback.

For each series size (``--slices``, 512 x 512 phantoms generated once and cached) and each
destination (``--dest``: a DCMTK storescp, a real Orthanc), the node runs as a process
(``ct-ai-node serve``, the default configuration's completeness and worker settings, one CPU
worker), the series is sent by ``storescu``, and the node's own records give each stage:

* completeness: from the last instance (storescu's exit) to the analysis job being queued;
* pickup: queued to claimed by the worker (its job log);
* analysis: claimed to the deliveries queued (``result.json`` splits it into load,
  pipeline and writers);
* sending: the deliveries queued to the last one acknowledged;
* total: last instance to the last delivery acknowledged.

References measured in the same run: storescu into a DCMTK storescp (the ingest a PACS does
anyway) and, for a second series size, the ratio to the first size. Peak memory is the
resident set of the node's whole process tree (listener, dispatcher, worker, the forked
heat-map writer; proportional set size, so shared pages count once), sampled every 0.1 s.

    python benchmarks/e2e.py [--slices 300,600] [--dest storescp,orthanc]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from ct_ai_node.peers import Orthanc, StoreSCP, free_port, nodelay_env, wait_for_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import SIZE, cached_series, send  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "ct-ai-node-bench"


def _tree_rss_mb(pid: int) -> float:
    """Memory of ``pid`` and all its descendants (MB), from /proc: the proportional set size
    (a page shared by two processes, e.g. with the forked heat-map writer, counts half in
    each), so the sum is what the tree really holds."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


class PeakSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self._done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.1):
            self.peak = max(self.peak, _tree_rss_mb(self.pid))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def _config(work: Path, port: int, dest: dict) -> Path:
    config = {
        "node": {"ae_title": "CTAI", "host": "127.0.0.1", "port": port},
        "storage": {"root": str(work / "node"), "min_free_mb": 512},
        "workers": {"count": 1, "device": "cpu"},
        "destinations": [dest],
        "rules": [{"name": "chest-ct", "when": [{"tag": "Modality", "equals": "CT"}], "action": "analyse",
                   "destinations": [dest["name"]]}],
    }
    path = work / "node.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _rows(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def run_once(work: Path, series_dir: Path, n_slices: int, dest_kind: str) -> dict:
    port = free_port()
    peer = (StoreSCP(work / "pacs") if dest_kind == "storescp" else Orthanc(work / "pacs")).start()
    try:
        dest = {"name": "pacs", "kind": "dicom", "host": "127.0.0.1",
                "port": peer.port if dest_kind == "storescp" else peer.dicom_port, "ae_title": peer.ae_title}
        cfg = _config(work, port, dest)
        log = open(work / "node.log", "wb")
        node = subprocess.Popen([sys.executable, "-m", "ct_ai_node", "serve", "--config", str(cfg)],
                                cwd=work, stdout=log, stderr=log, env=nodelay_env(), start_new_session=True)
        sampler = PeakSampler(node.pid)
        try:
            wait_for_port(port, 60, node)
            time.sleep(8)  # the worker process imports torch and loads the models first
            sampler.start()
            send_s = send(port, "CTAI", series_dir)
            last = time.time()
            db = work / "node" / "node.db"
            deadline = time.monotonic() + 900
            while True:
                rows = _rows(db, "SELECT state FROM jobs WHERE kind = 'analyse'")
                if rows and rows[0][0] in ("done", "failed", "dead"):
                    break
                if time.monotonic() > deadline or node.poll() is not None:
                    raise RuntimeError(f"no result ({rows}); see {work / 'node.log'}")
                time.sleep(0.05)
            peak = sampler.stop()
        finally:
            node.terminate()
            node.wait(30)
            log.close()
            # kept for a look at the timeline (the work folder goes)
            (CACHE / f"e2e-node-{n_slices}-{dest_kind}.log").write_bytes((work / "node.log").read_bytes())
        (job_id, state, queued), = _rows(db, "SELECT id, state, created_at FROM jobs WHERE kind = 'analyse'")
        claimed = _rows(db, "SELECT MIN(at) FROM job_log WHERE job_id = ? AND message LIKE '%claimed by%'",
                        (job_id,))[0][0]
        deliveries = _rows(db, "SELECT MIN(created_at), MAX(updated_at) FROM jobs WHERE parent_id = ?", (job_id,))
        out_queued, acked = deliveries[0]
        result = json.loads((work / "node" / "outbox" / f"job-{job_id}" / "result.json").read_text())
        t = result.get("timings_s", {})
        objects = len(result.get("outputs") or {})
        return {"slices": n_slices, "dest": dest_kind, "state": state, "send_s": send_s,
                "completeness_s": queued - last, "pickup_s": claimed - queued, "analysis_s": out_queued - claimed,
                "load_s": t.get("load"), "pipeline_s": t.get("pipeline"), "writers_s": t.get("outputs"),
                "sending_s": acked - out_queued, "total_s": acked - last, "objects": objects, "peak_mb": peak}
    finally:
        peer.close()


def reference_ingest(work: Path, series_dir: Path) -> float:
    with StoreSCP(work / "ref").start() as peer:
        return send(peer.port, peer.ae_title, series_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", default="300,600", help="series sizes, comma-separated")
    ap.add_argument("--dest", default="storescp,orthanc", help="destinations: storescp, orthanc")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.slices.split(",")]
    results = []
    for n in sizes:
        files = cached_series(CACHE / f"ingest-{SIZE}x{SIZE}x{n}", n)
        series_dir = files[0].parent
        with tempfile.TemporaryDirectory(prefix="e2e-ref-") as work:
            ref = reference_ingest(Path(work), series_dir)
        for dest in args.dest.split(","):
            with tempfile.TemporaryDirectory(prefix=f"e2e-{n}-{dest}-") as work:
                r = run_once(Path(work), series_dir, n, dest)
            r["ref_ingest_s"] = ref
            results.append(r)
            print(f"{n} slices -> {dest}: results acknowledged {r['total_s']:.1f} s after the last instance "
                  f"({r['state']}, {r['objects']} objects), peak memory {r['peak_mb']:.0f} MB", flush=True)
    print("\nwhole node on this machine, one CPU worker, default completeness settings; "
          "reference: storescu into DCMTK storescp")
    head = (f"{'series':>8} {'dest':>9} {'send':>6} {'complete':>9} {'pickup':>7} {'analysis':>9} "
            f"{'(load':>6} {'pipeline':>9} {'writers)':>9} {'sending':>8} {'TOTAL':>7} {'x ref':>6} {'peak MB':>8}")
    print(head)
    for r in results:
        print(f"{r['slices']:>8} {r['dest']:>9} {r['send_s']:6.2f} {r['completeness_s']:9.2f} {r['pickup_s']:7.2f} "
              f"{r['analysis_s']:9.2f} {r['load_s'] or 0:6.2f} {r['pipeline_s'] or 0:9.2f} {r['writers_s'] or 0:9.2f} "
              f"{r['sending_s']:8.2f} {r['total_s']:7.2f} {r['total_s'] / r['ref_ingest_s']:6.1f} {r['peak_mb']:8.0f}")
    by = {(r["slices"], r["dest"]): r for r in results}
    if len(sizes) > 1:
        for dest in args.dest.split(","):
            a, b = by.get((sizes[0], dest)), by.get((sizes[-1], dest))
            if a and b:
                print(f"{sizes[-1]} / {sizes[0]} slices, {dest}: {b['total_s'] / a['total_s']:.2f}x "
                      f"(target <= 2.1x)")
    worst = max(r["total_s"] for r in results if r["slices"] == sizes[0])
    print(f"{sizes[0]} slices, last instance -> acknowledged: {worst:.1f} s at worst (target <= 10 s: "
          f"{'met' if worst <= 10 else 'NOT met'}); peak memory {max(r['peak_mb'] for r in results):.0f} MB "
          f"(target <= 4096)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
