"""Build the result objects of one analysis and write them into a folder.

The writers are pure and single-threaded Python (highdicom, pydicom encoding), and the
heat-map series is about half of their work (one RGB Secondary Capture per lung
slice). On a machine with two or more cores the heat-map series is built and written
by a forked child process while this process builds and writes the SEG, key images,
SR and KOS: the child inherits the volume and result without copying or pickling.
Without ``fork`` (or on one core) everything runs here, with the same files.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import traceback
import warnings
from pathlib import Path

import pydicom

from ct_ai_node.errors import OutputError
from ct_ai_node.pipeline.types import AnalysisResult
from ct_ai_node.volume.types import Volume
from ct_ai_node.writers import build_heatmap_series, build_outputs
from ct_ai_node.writers.common import ResultUids, SeriesNumbers

logger = logging.getLogger(__name__)


def write_dataset(ds: pydicom.Dataset, path: Path) -> None:
    """Write atomically: a half-written file is never seen under its final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def heatmap_file_name(number: int) -> str:
    return f"heatmap_{number:04d}.dcm"


def _write_heatmaps(volume: Volume, result: AnalysisResult, out_dir: Path, series_number_base: int,
                    uids: ResultUids) -> dict:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        images = build_heatmap_series(volume, result, SeriesNumbers(series_number_base).heatmap, uids=uids)
    built = time.perf_counter()
    names = {}
    for number, ds in enumerate(images, start=1):
        write_dataset(ds, out_dir / heatmap_file_name(number))
        names[heatmap_file_name(number)] = str(ds.SOPClassUID)
    return {"outputs": names, "timings": {"heatmap": round(built - start, 3),
                                          "write_heatmaps": round(time.perf_counter() - built, 3)}}


def _heatmap_child(volume, result, out_dir, series_number_base, uids, conn) -> None:
    try:
        conn.send(("ok", _write_heatmaps(volume, result, out_dir, series_number_base, uids)))
    except BaseException as exc:  # reported to the parent, which raises OutputError
        logger.debug("heat-map child failed:\n%s", traceback.format_exc())
        conn.send(("error", f"heat-map series: {' '.join(str(exc).split())}"))
    finally:
        conn.close()


def _can_fork() -> bool:
    return ("fork" in multiprocessing.get_all_start_methods() and (os.cpu_count() or 1) >= 2
            and not multiprocessing.current_process().daemon)


def write_outputs(volume: Volume, result: AnalysisResult, out_dir: Path, *, series_number_base: int = 900,
                  parallel: bool = True, uids: ResultUids | None = None) -> tuple[dict[str, str], dict[str, float]]:
    """Build and write every result object; returns (file name -> SOP Class UID in the
    order seg, heat maps, key images, SR, KOS) and the seconds per step. ``uids``: see
    :class:`ResultUids` (default: derived from the source series and model, revision 1).

    Raises OutputError when an object cannot be built or written."""
    uids = uids or ResultUids.for_analysis(volume, result)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fork = parallel and _can_fork()
    child = conn = None
    if fork:
        ctx = multiprocessing.get_context("fork")
        conn, child_conn = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_heatmap_child, args=(volume, result, out_dir, series_number_base, uids, child_conn),
                            name="ct-ai-node-heatmaps", daemon=True)
        child.start()
        child_conn.close()
    try:
        start = time.perf_counter()
        built = build_outputs(volume, result, series_number_base=series_number_base, heatmaps=False, uids=uids)
        timings = {f"writers.{k}": v for k, v in built.timings_s.items()}
        t_write = time.perf_counter()
        own = {}
        for name, ds in built.named():
            write_dataset(ds, out_dir / name)
            own[name] = str(ds.SOPClassUID)
        timings["write_files"] = round(time.perf_counter() - t_write, 3)
        if fork:
            heat = _receive(child, conn)
        else:
            heat = _write_heatmaps(volume, result, out_dir, series_number_base, uids)
        timings.update({("writers.heatmap" if k == "heatmap" else k): v for k, v in heat["timings"].items()})
        timings["outputs_wall"] = round(time.perf_counter() - start, 3)
    finally:
        if child is not None and child.is_alive():
            child.kill()
            child.join()
    names = list(own)
    outputs = {names[0]: own[names[0]], **heat["outputs"], **{n: own[n] for n in names[1:]}}
    return outputs, timings


def _receive(child, conn) -> dict:
    try:
        status, payload = conn.recv()
    except EOFError:
        child.join()
        raise OutputError(f"heat-map series: the writer process ended without an answer "
                          f"(exit code {child.exitcode})") from None
    child.join()
    if status != "ok":
        raise OutputError(payload)
    return payload
