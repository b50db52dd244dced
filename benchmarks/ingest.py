"""Benchmark: receiving a 300-slice 512x512 chest CT (~150 MB) over DICOM on loopback.

`storescu +sd` (TCP_NODELAY=1) sends the whole series, timed from start to exit,
into (a) DCMTK storescp, (b) a real Orthanc and (c) the node's SCP
(`python -m ct_ai_node.ingress`, which fsyncs every instance and indexes it before
answering) and (d) the node's SCP with `storage.fsync: false` (written, not fsynced:
Orthanc's durability), and (e) a bare pynetdicom SCP that answers success and keeps
nothing: the floor of any receiver built on pynetdicom, as the node's is. Each receiver
starts fresh (empty storage) for every repetition, and the repetitions are interleaved so
machine noise hits all alike; the median of 3 is reported. Targets (issue 15): the node no
slower than Orthanc, and without fsync no more than 2x storescp.

Then the whole node (`Node`: SCP, dispatcher, a worker process) receives the same
series and analyses it, and the time from the last instance sent (storescu exits)
to the results acknowledged by the destination (a DCMTK storescp) is printed, with
the share spent waiting for the series to count as complete and in the analysis itself.

    python benchmarks/ingest.py [--reps 3] [--cache DIR] [--no-results]

The phantom series (~20 s to generate) is cached under the system temp folder.
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

from ct_ai_node.peers import Orthanc, StoreSCP, free_port, nodelay_env, wait_for_port
from ct_ai_node.spool import Spool

N_SLICES, SIZE = 300, 512
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "ct-ai-node-bench" / f"ingest-{SIZE}x{SIZE}x{N_SLICES}"


def cached_series(folder: Path, n_slices: int = N_SLICES) -> list[Path]:
    """The phantom series (``n_slices`` of 512 x 512), generated once; a marker file says the
    folder is complete."""
    done = folder / "COMPLETE"
    if not done.exists():
        from ct_ai_node.synthetic import generate_phantom, write_dicom_series

        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        print(f"generating a {n_slices}x{SIZE}x{SIZE} phantom series into {folder} ...", flush=True)
        phantom = generate_phantom(7, kind="covid", shape=(n_slices, SIZE, SIZE), spacing=(1.0, 0.7, 0.7))
        write_dicom_series(phantom, folder / "dicom")
        done.write_text("ok\n")
        print(f"  done in {time.perf_counter() - t:.1f} s")
    files = sorted((folder / "dicom").glob("*.dcm"))
    assert len(files) == n_slices, f"{folder}: {len(files)} files; delete the folder to regenerate"
    return files


def send(port: int, called_ae: str, series_dir: Path) -> float:
    cmd = ["storescu", "-aet", "PACS", "-aec", called_ae, "127.0.0.1", str(port), "+sd", str(series_dir)]
    t = time.perf_counter()
    res = subprocess.run(cmd, env=nodelay_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed: {res.stderr.strip()[-500:]}")
    return elapsed


def time_storescp(work: Path, series_dir: Path) -> float:
    with StoreSCP(work / "storescp").start() as peer:
        elapsed = send(peer.port, peer.ae_title, series_dir)
        assert len(peer.received()) == N_SLICES
    return elapsed


def time_orthanc(work: Path, series_dir: Path) -> float:
    with Orthanc(work / "orthanc").start() as peer:
        return send(peer.dicom_port, peer.ae_title, series_dir)


def time_node(work: Path, series_dir: Path, fsync: bool = True) -> float:
    root, port = work / "node", free_port()
    cmd = [sys.executable, "-m", "ct_ai_node.ingress", "--root", str(root), "--port", str(port), "--host",
           "127.0.0.1", "--ae", "CTAI", "--min-free-mb", "512", "--log-level", "WARNING"]
    if not fsync:
        cmd.append("--no-fsync")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, 30, proc)
        elapsed = send(port, "CTAI", series_dir)
    finally:
        proc.terminate()
        proc.wait(30)
    with Spool(root / "spool", root / "node.db") as spool:
        (rec,) = spool.series()
        assert rec.instance_count == N_SLICES, rec
    return elapsed


# a pynetdicom Storage SCP that keeps nothing: the floor of any pynetdicom-based receiver
_BARE_SCP = """
import socket, sys
from pynetdicom import AE, AllStoragePresentationContexts, evt
ae = AE(ae_title="BARE")
ae.maximum_pdu_size = 1 << 20
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax)
def nodelay(event):
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000),
                                                              (evt.EVT_CONN_OPEN, nodelay)])
"""


def time_bare_pynetdicom(work: Path, series_dir: Path) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _BARE_SCP, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 30, proc)
        return send(port, "BARE", series_dir)
    finally:
        proc.terminate()
        proc.wait(30)


def node_config(work: Path, pacs, **sections):
    """The whole node of the benchmarks: CTAI on a free port, storage in ``work``, one CPU
    worker, results to ``pacs`` (a StoreSCP); ``sections`` added (e.g. ``web``)."""
    from ct_ai_node.config import default_config

    return default_config(
        node={"ae_title": "CTAI", "host": "127.0.0.1", "port": free_port()},
        storage={"root": str(work / "node"), "min_free_mb": 512},
        completeness={"quiet_time_s": 2, "check_interval_s": 0.2},
        workers={"count": 1, "lease_s": 300, "device": "cpu"},
        destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port,
                       "ae_title": pacs.ae_title}],
        **sections,
    ).resolved()


def wait_for_analysis(node, limit_s: float = 900):
    """(the analyse job once final, seconds waited from now)."""
    from ct_ai_node.jobqueue import FINAL_STATES

    t_sent = time.perf_counter()
    while True:
        jobs = node.queue.list(kind="analyse")
        if jobs and jobs[0].state in FINAL_STATES:
            return jobs[0], time.perf_counter() - t_sent
        if time.perf_counter() - t_sent > limit_s:
            raise RuntimeError(f"no result after {limit_s:g} s")
        time.sleep(0.1)


def time_results(work: Path, series_dir: Path) -> dict:
    """storescu -> node -> analysis -> storescp: seconds from the last instance sent to the
    results acknowledged by the destination (the analyse job done)."""
    import json

    from ct_ai_node.node import Node

    with StoreSCP(work / "pacs").start() as pacs:
        config = node_config(work, pacs)
        node = Node(config, log_level=30).start()
        try:
            time.sleep(8)  # let the worker process import torch before the clock starts
            send_s = send(node.port, "CTAI", series_dir)
            job, total = wait_for_analysis(node)
            result = json.loads((config.storage.outbox_dir / f"job-{job.id}" / "result.json").read_text())
        finally:
            node.stop()
        return {"state": str(job.state), "send_s": send_s, "results_s": total,
                "analysis_s": result.get("timings_s", {}).get("total"), "objects": len(pacs.received())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DICOM ingest: storescp vs Orthanc vs the node's SCP")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--no-results", action="store_true", help="skip the end-to-end analysis timing")
    args = ap.parse_args(argv)
    files = cached_series(args.cache)
    series_dir = files[0].parent
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    receivers = {"storescp": time_storescp, "orthanc": time_orthanc, "node": time_node,
                 "node_nofsync": lambda work, d: time_node(work, d, fsync=False), "bare": time_bare_pynetdicom}
    times: dict[str, list[float]] = {name: [] for name in receivers}
    for rep in range(args.reps):
        for name, fn in receivers.items():
            with tempfile.TemporaryDirectory(prefix=f"ingest-{name}-") as work:
                times[name].append(fn(Path(work), series_dir))
        print(f"rep {rep + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)

    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{N_SLICES}x{SIZE}x{SIZE} CT, {size_mb:.0f} MB, storescu +sd with TCP_NODELAY=1, "
          f"median of {args.reps} (interleaved, fresh receiver each time)")
    for name, label in (("storescp", "DCMTK storescp"), ("orthanc", "Orthanc"), ("node", "node SCP (fsync+index)"),
                        ("node_nofsync", "node SCP (storage.fsync false)"),
                        ("bare", "pynetdicom, keeping nothing")):
        print(f"  {label:24s} {med[name]:6.2f} s   {size_mb / med[name]:6.0f} MB/s   "
              f"runs: {', '.join(f'{t:.2f}' for t in times[name])}")
    print(f"  node / storescp          {med['node'] / med['storescp']:6.2f}x")
    print(f"  node / Orthanc           {med['node'] / med['orthanc']:6.2f}x  "
          f"(target <= 1: {'met' if med['node'] <= med['orthanc'] else 'NOT met'}; fsync per instance, "
          f"which Orthanc does not do)")
    print(f"  node no fsync / Orthanc  {med['node_nofsync'] / med['orthanc']:6.2f}x  "
          f"(same durability as Orthanc: survives a crash of the receiver, not a power cut)")
    ratio = med['node_nofsync'] / med['storescp']
    print(f"  node no fsync / storescp {ratio:6.2f}x  (target <= 2: {'met' if ratio <= 2 else 'NOT met'}; "
          f"pynetdicom alone, keeping nothing: {med['bare'] / med['storescp']:.2f}x)")
    if not args.no_results:
        with tempfile.TemporaryDirectory(prefix="ingest-results-") as work:
            r = time_results(Path(work), series_dir)
        print(f"\nwhole node, same series: sent in {r['send_s']:.2f} s; results acknowledged by the destination "
              f"{r['results_s']:.1f} s after the last instance (job {r['state']}, {r['objects']} objects; "
              f"analysis {r['analysis_s']:.1f} s, the rest is the completeness wait and sending)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
