"""Benchmark: scanning and loading a 512x512x300 CT series (the node's `volume` stage)
against plain pydicom reading of the same files, measured in the same run.

    python benchmarks/load.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers_dicom import write_ct_series  # noqa: E402

from ct_ai_node.volume import load_volume, scan_folder  # noqa: E402


def best_of(fn, n=3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        series = write_ct_series(Path(tmp), n=300, rows=512, cols=512, spacing=(1.0, 0.7, 0.7))

        def reference():
            dss = [pydicom.dcmread(p) for p in series.paths]
            return np.stack([d.pixel_array for d in dss])

        t_ref = best_of(reference)
        t_scan = best_of(lambda: scan_folder(series.paths[0].parent).summaries())
        t_load = best_of(lambda: load_volume(series.paths))
        print(f"512x512x300 CT, best of 3 on this machine")
        print(f"reference: pydicom read + stack      {t_ref:6.2f} s")
        print(f"scan_folder + summaries (headers)    {t_scan:6.2f} s  ({t_scan / t_ref:.2f}x reference)")
        print(f"load_volume (sorted HU volume)       {t_load:6.2f} s  ({t_load / t_ref:.2f}x reference)")
        print(f"target: load <= 3 s -> {'met' if t_load <= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
