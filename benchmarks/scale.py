"""Benchmark: studies per hour with 1, 2 and 3 workers on the shared PostgreSQL queue, and
the queue's own cost per job on both engines.

Throughput: a PostgreSQL server of the benchmark's own (``initdb``/``pg_ctl`` in a temporary
folder), an ingress node (``Node`` with ``workers.count: 0`` and its web app) and a pool of
N worker processes that fetch each series from the ingress node over WADO-RS, as worker hosts
do; results go to a DCMTK storescp. The bundled phantom series (56 slices) is sent as
``--studies`` different studies by ``storescu``, back to back; the clock runs from the first
send to the last analyse job done (every delivery acknowledged). Printed: studies per hour
and the ratio to 1 worker, measured in the same run. On a 2-core CPU the workers share the
cores, so the ratio says what the queue and the fetch cost, not what more GPUs would give.

Queue overhead: ``--jobs`` empty jobs enqueued, then claimed and completed one by one on the
embedded (SQLite, fsync on) and the distributed (PostgreSQL on loopback) queue: the median
time of a claim (what a worker waits between asking and starting) and of a complete.

    python benchmarks/scale.py [--studies 6] [--workers 1,2,3] [--jobs 300]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ct_ai_node.peers import Postgres, StoreSCP, free_port, nodelay_env

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_series" / "covid_like"


def make_studies(work: Path, n: int) -> list[Path]:
    """``n`` copies of the sample series, each a different study (new UIDs)."""
    from ct_ai_node.synthetic import copy_as_new_study

    folders = [work / f"study{i}" for i in range(n)]
    for folder in folders:
        copy_as_new_study(SAMPLE, folder)
    return folders


def throughput(work: Path, pg: Postgres, studies: list[Path], n_workers: int) -> dict:
    from ct_ai_node.config import default_config
    from ct_ai_node.jobqueue import FINAL_STATES, JobState
    from ct_ai_node.node import Node
    from ct_ai_node.node.worker_pool import WorkerPool

    url = pg.new_database(f"scale_{n_workers}_{int(time.time())}")
    with StoreSCP(work / f"pacs{n_workers}").start() as pacs:
        common = dict(
            node={"ae_title": "CTAI", "host": "127.0.0.1", "port": free_port()},
            completeness={"quiet_time_s": 2, "check_interval_s": 0.2},
            queue={"kind": "postgres", "url": url},
            destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port,
                           "ae_title": pacs.ae_title}],
            rules=[{"name": "chest-ct", "when": [{"tag": "Modality", "equals": "CT"}], "action": "analyse",
                    "destinations": ["pacs"]}],
        )
        web_port = free_port()
        ingress = default_config(storage={"root": str(work / f"ingress{n_workers}"), "min_free_mb": 512},
                                 workers={"count": 0, "device": "cpu"},
                                 web={"host": "127.0.0.1", "port": web_port}, **common).resolved()
        workers_cfg = default_config(storage={"root": str(work / f"workers{n_workers}"), "min_free_mb": 512},
                                     workers={"count": n_workers, "device": "cpu", "lease_s": 300,
                                              "fetch_from": f"http://127.0.0.1:{web_port}"},
                                     **common).resolved()
        node = Node(ingress, log_level=30).start()
        pool = WorkerPool(workers_cfg, n_workers, log_level=30, name="bench").start()
        try:
            time.sleep(10)  # let the worker processes import torch before the clock starts
            start = time.perf_counter()
            for folder in studies:
                cmd = ["storescu", "-aet", "PACS", "-aec", "CTAI", "127.0.0.1", str(ingress.node.port), "+sd",
                       str(folder)]
                subprocess.run(cmd, env=nodelay_env(), check=True, capture_output=True, timeout=120)
            while True:
                jobs = node.queue.list(kind="analyse", limit=1000)
                if len(jobs) == len(studies) and all(j.state in FINAL_STATES for j in jobs):
                    break
                if time.perf_counter() - start > 1800:
                    raise RuntimeError(f"{n_workers} worker(s): not done after 30 min: {jobs}")
                time.sleep(0.2)
            elapsed = time.perf_counter() - start
        finally:
            pool.stop()
            node.stop()
        done = sum(j.state == JobState.DONE for j in jobs)
        return {"workers": n_workers, "seconds": elapsed, "done": done,
                "per_hour": done / elapsed * 3600, "objects": len(pacs.received())}


def queue_overhead(work: Path, pg: Postgres, n_jobs: int) -> dict:
    from ct_ai_node.jobqueue import SqliteJobQueue
    from ct_ai_node.jobqueue.postgres import PostgresJobQueue

    out = {}
    queues = {"embedded (SQLite)": SqliteJobQueue(work / "overhead.db"),
              "distributed (PostgreSQL)": PostgresJobQueue(pg.new_database(f"overhead_{int(time.time())}"))}
    for name, queue in queues.items():
        for n in range(n_jobs):
            queue.enqueue("analyse", {"series_key": f"s{n}"})
        claims, completes = [], []
        for _ in range(n_jobs):
            t = time.perf_counter()
            job = queue.claim(["analyse"], "bench", 60, lanes=["bench"])
            claims.append(time.perf_counter() - t)
            t = time.perf_counter()
            queue.complete(job.id, owner="bench")
            completes.append(time.perf_counter() - t)
        queue.close()
        out[name] = {"claim_ms": statistics.median(claims) * 1000, "complete_ms": statistics.median(completes) * 1000}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--workers", default="1,2,3", help="worker counts to run, comma-separated")
    parser.add_argument("--jobs", type=int, default=300, help="jobs for the queue overhead")
    args = parser.parse_args(argv)
    if shutil.which("storescu") is None:
        print("storescu (DCMTK) not installed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ct-ai-node-scale-"))
    work.chmod(0o711)  # as root the server runs as `postgres`, which must enter this folder
    try:
        with Postgres(work / "postgres").start() as pg:
            overhead = queue_overhead(work, pg, args.jobs)
            print(f"queue overhead per job (median of {args.jobs}):")
            for name, o in overhead.items():
                print(f"  {name:26s} claim {o['claim_ms']:6.2f} ms   complete {o['complete_ms']:6.2f} ms")
            studies = make_studies(work / "studies", args.studies)
            results = []
            for n in [int(x) for x in args.workers.split(",")]:
                r = throughput(work, pg, studies, n)
                results.append(r)
                print(f"{n} worker(s): {r['done']}/{args.studies} studies in {r['seconds']:.1f} s = "
                      f"{r['per_hour']:.0f} studies/hour ({r['objects']} result objects acknowledged)", flush=True)
            base = results[0]["per_hour"]
            print("studies per hour, ratio to 1 worker:")
            for r in results:
                print(f"  {r['workers']} worker(s): {r['per_hour']:7.0f}  x{r['per_hour'] / base:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
