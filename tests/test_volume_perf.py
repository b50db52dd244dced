"""Loading a full-size series (300 slices of 512 x 512): shape and memory. Times are
measured in benchmarks/load.py, not asserted here."""

from __future__ import annotations

import tracemalloc

import pytest
from helpers_dicom import write_ct_series

from ct_ai_node.volume import load_volume, scan_folder

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def big_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    return write_ct_series(folder, n=300, rows=512, cols=512, spacing=(1.0, 0.7, 0.7))


def test_512x512x300_loads(big_series):
    volume = load_volume(big_series.paths)
    assert volume.shape == (300, 512, 512)
    assert volume.spacing[0] == pytest.approx(1.0)


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


def test_scan_of_300_full_size_files(big_series):
    scan = scan_folder(big_series.paths[0].parent)
    assert scan.n_dicom == 300 and scan.summaries()[0].n_frames == 300
