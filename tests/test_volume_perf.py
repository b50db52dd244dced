"""Speed and memory of loading a full-size series: 300 slices of 512 x 512."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from helpers_dicom import write_ct_series

from ct_ai_node.volume import load_volume, scan_folder

pytestmark = pytest.mark.slow

#: the budget on the reference machine (2 cores): 3 s for 512 x 512 x 300
LOAD_BUDGET_S = 3.0


@pytest.fixture(scope="module")
def big_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    return write_ct_series(folder, n=300, rows=512, cols=512, spacing=(1.0, 0.7, 0.7))


def test_512x512x300_loads_within_budget(big_series):
    times = []
    for _ in range(2):  # best of two: the machine is shared with other test runs
        start = time.perf_counter()
        volume = load_volume(big_series.paths)
        times.append(time.perf_counter() - start)
        assert volume.shape == (300, 512, 512)
        del volume
    print(f"load 512x512x300: best {min(times):.2f} s of {times}")
    assert min(times) <= LOAD_BUDGET_S, f"load took {min(times):.2f} s"


def test_512x512x300_holds_at_most_two_copies(big_series):
    tracemalloc.start()
    try:
        volume = load_volume(big_series.paths[:100])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    hu_bytes = volume.hu.nbytes  # float32: one "copy"
    encoded = sum(len(ds.PixelData) for ds in volume.datasets)  # kept for the writers
    assert encoded == hu_bytes // 2
    assert peak <= 2 * hu_bytes, f"peak {peak / 1e6:.0f} MB for a {hu_bytes / 1e6:.0f} MB volume"


def test_scan_of_300_full_size_files_is_fast(big_series):
    start = time.perf_counter()
    scan = scan_folder(big_series.paths[0].parent)
    scan.summaries()
    elapsed = time.perf_counter() - start
    assert scan.n_dicom == 300
    assert elapsed < 1.0, f"scan took {elapsed:.2f} s"
