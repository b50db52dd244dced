"""Benchmark: does a busy web app slow the node down?

A whole node (`Node`: SCP, dispatcher, one worker, the web app on loopback) receives the
300-slice 512x512 phantom series of `benchmarks/ingest.py` by `storescu` and analyses it,
results to a DCMTK storescp; once quietly, once while 20 clients (threads of another
process, at the lowest CPU priority: they stand for browsers and scripts on other machines)
poll the dashboard and the JSON API (`/`, `/api/status`, alternately, each client
once a second); with `--control` they poll `/healthz` instead, which costs the node next to
nothing: the ratio then is what the clients themselves cost on this machine (its 2 cores). Runs are interleaved; the median of `--reps` is reported. Printed: ingest
time (storescu start to exit) and time to results (last instance sent to the analysis
job done), with the ratios loaded / quiet (target: ingest at most 1.10), and the pollers'
request latencies.

    python benchmarks/web_load.py [--reps 2] [--clients 20] [--control]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import DEFAULT_CACHE, N_SLICES, cached_series, node_config, send, wait_for_analysis  # noqa: E402

from ct_ai_node.peers import StoreSCP, free_port  # noqa: E402


def poll(base: str, clients: int, period_s: float, stop, out, paths=("/", "/api/status")) -> None:
    """In a child process: ``clients`` threads polling until ``stop`` is set; latencies and
    errors go back on ``out``."""
    import os

    import httpx

    # the clients stand for browsers and scripts on other machines: at the lowest priority
    # here, they do not take this machine's cores from the node (what is measured is the
    # node serving them); --control shows what they still cost
    os.nice(19)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            n = 0
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    ok = http.get(paths[(n + i) % len(paths)]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    errors[0] += 0 if ok else 1
                n += 1
                stop.wait(max(0.0, period_s - dt))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out.put((latencies, errors[0]))


def run_once(work: Path, series_dir: Path, clients: int, paths=("/", "/api/status")) -> dict:
    from ct_ai_node.node import Node

    web_port = free_port()
    with StoreSCP(work / "pacs").start() as pacs:
        config = node_config(work, pacs, web={"host": "127.0.0.1", "port": web_port})
        node = Node(config, log_level=30).start()
        ctx = multiprocessing.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        poller = None
        try:
            time.sleep(8)  # the worker imports torch before the clock starts
            if clients:
                poller = ctx.Process(target=poll, args=(f"http://127.0.0.1:{web_port}", clients, 1.0, stop, out,
                                                        tuple(paths)))
                poller.start()
                time.sleep(3)  # the clients are polling when the series arrives
            send_s = send(node.port, "CTAI", series_dir)
            job, results_s = wait_for_analysis(node)
        finally:
            latencies, errors = [], 0
            if poller is not None:
                stop.set()
                latencies, errors = out.get(timeout=60)
                poller.join(30)
            node.stop()
    return {"send_s": send_s, "results_s": results_s, "state": str(job.state), "requests": len(latencies),
            "errors": errors, "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p95_ms": 1000 * sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ingest and analysis with and without 20 web clients polling")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--control", action="store_true",
                    help="the clients poll /healthz (next to no work in the node): what the clients "
                         "themselves cost on this machine")
    args = ap.parse_args(argv)
    files = cached_series(args.cache)
    series_dir = files[0].parent
    quiet, loaded = [], []
    with tempfile.TemporaryDirectory(prefix="ctai-webload-") as tmp:
        for rep in range(args.reps):
            for clients, into in ((0, quiet), (args.clients, loaded)):
                work = Path(tmp) / f"r{rep}-c{clients}"
                res = run_once(work, series_dir, clients, ("/healthz",) if args.control else ("/", "/api/status"))
                into.append(res)
                print(f"rep {rep + 1} clients {clients:2d}: ingest {res['send_s']:.2f} s, results {res['results_s']:.1f} s "
                      f"({res['state']}), {res['requests']} requests, {res['errors']} errors"
                      + (f", p50 {res['p50_ms']:.0f} ms, p95 {res['p95_ms']:.0f} ms" if res["requests"] else ""),
                      flush=True)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    what = "/healthz (control)" if args.control else "the dashboard and /api/status"
    print(f"\n{N_SLICES}-slice series, median of {args.reps}, {args.clients} clients polling {what} once a second:")
    print(f"  ingest   quiet {med(quiet, 'send_s'):.2f} s, with {args.clients} clients {med(loaded, 'send_s'):.2f} s: "
          f"ratio {med(loaded, 'send_s') / med(quiet, 'send_s'):.2f} (target <= 1.10)")
    print(f"  results  quiet {med(quiet, 'results_s'):.1f} s, with {args.clients} clients "
          f"{med(loaded, 'results_s'):.1f} s: ratio {med(loaded, 'results_s') / med(quiet, 'results_s'):.2f}")
    print(f"  requests {sum(r['requests'] for r in loaded)}, errors {sum(r['errors'] for r in loaded)}, "
          f"p50 {med(loaded, 'p50_ms'):.0f} ms, p95 {med(loaded, 'p95_ms'):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
