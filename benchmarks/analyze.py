"""Benchmark: `analyze` on a 512x512x300 synthetic chest CT on this machine.

Prints per-stage times, peak memory (resident set size of a fresh process) and the
ratio of the whole analysis to a reference measured in the same run: reading the
same files with plain pydicom and stacking them into a HU array (the least any
analysis must do). Target (issue 2): whole analyze <= 30 s on a 2-core CPU.

    python benchmarks/analyze.py [--slices 300] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
mode, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
t = time.perf_counter()
if mode == "reference":
    import numpy as np, pydicom
    dss = [pydicom.dcmread(f) for f in sorted(src.iterdir())]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]).astype("float32")
    info = {"shape": list(hu.shape)}
else:
    from ct_ai_node.analyze import AnalyzeOptions, analyze_folder
    doc = analyze_folder(src, out, AnalyzeOptions(device="cpu"))
    info = {"status": doc.status, "reason": doc.reason, "timings_s": doc.timings_s, "outputs": len(doc.outputs),
            "label": doc.label, "probability": doc.probability}
info["seconds"] = time.perf_counter() - t
info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
# the heat-map writer runs in a forked child: its peak counts too
info["peak_rss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(info))
"""


def run_child(mode: str, src: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--keep", type=Path, default=None, help="keep the phantom and outputs here")
    args = ap.parse_args()

    from ct_ai_node.synthetic import generate_phantom, write_dicom_series

    work = args.keep or Path(tempfile.mkdtemp(prefix="ctai-bench-"))
    src, out = work / "dicom", work / "out"
    if not src.is_dir() or not any(src.iterdir()):
        t = time.perf_counter()
        ph = generate_phantom(args.seed, kind="covid", shape=(args.slices, args.size, args.size), spacing=(1.0, 0.7, 0.7))
        write_dicom_series(ph, src)
        print(f"phantom {ph.hu.shape} written in {time.perf_counter() - t:.1f} s -> {src}")
    ref = run_child("reference", src, out)
    res = run_child("analyze", src, out)
    if res.get("status") != "done":
        raise SystemExit(f"analyze did not finish: {res}")
    print(f"\nanalyze of a {args.size}x{args.size}x{args.slices} CT on {resource.getpagesize() and ''}this CPU (torch threads default)")
    print(f"{'stage':32s} {'seconds':>8s}")
    for k, v in res["timings_s"].items():
        print(f"{k:32s} {v:8.2f}")
    print(f"{'whole analyze (process)':32s} {res['seconds']:8.2f}")
    print(f"{'reference: pydicom read + HU':32s} {ref['seconds']:8.2f}")
    print(f"ratio analyze / reference: {res['seconds'] / ref['seconds']:.1f}x")
    print(f"peak memory: analyze {res['peak_rss_mb']:.0f} MB, reference {ref['peak_rss_mb']:.0f} MB "
          f"(ratio {res['peak_rss_mb'] / ref['peak_rss_mb']:.1f}x); forked heat-map writer "
          f"{res['peak_rss_children_mb']:.0f} MB (pages shared with the parent are counted in both)")
    print(f"target: whole analyze <= 30 s -> {'met' if res['seconds'] <= 30 else 'NOT met'}")
    print(f"result: {res['label']} p={res['probability']}, {res['outputs']} output objects")


if __name__ == "__main__":
    main()
