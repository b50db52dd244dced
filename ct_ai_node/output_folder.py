"""Build the result objects of one analysis and write them into a folder.

The writers are pure and single-threaded Python (highdicom, pydicom encoding), and the
heat-map series is about half of their work (one RGB Secondary Capture per lung
slice). On a machine with two or more cores the heat-map series is built and written
by a forked child process while this process builds and writes the SEG, key images,
SR, KOS and PDF report: the child inherits the volume and result without copying or pickling.
Without ``fork`` (or on one core) everything runs here, with the same files.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from ct_ai_node.errors import OutputError
from ct_ai_node.pipeline.types import AnalysisResult
from ct_ai_node.volume.types import Volume
from ct_ai_node.writers import OutputSet, build_outputs, iter_heatmap_series, one_line
from ct_ai_node.writers.source_header import sanitise_volume
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
    build_s = write_s = 0.0
    names: dict[str, str] = {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            images = iter_heatmap_series(volume, result, SeriesNumbers(series_number_base).heatmap, uids=uids)
            for number in itertools.count(1):
                t0 = time.perf_counter()
                ds = next(images, None)
                t1 = time.perf_counter()
                build_s += t1 - t0
                if ds is None:
                    break
                # each image is stored before the next is built: one in memory, not the series
                write_dataset(ds, out_dir / heatmap_file_name(number))
                names[heatmap_file_name(number)] = str(ds.SOPClassUID)
                write_s += time.perf_counter() - t1
    except BaseException:  # no partial series left behind: the outputs say there is none
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
        raise
    return {"outputs": names, "timings": {"heatmap": round(build_s, 3), "write_heatmaps": round(write_s, 3)}}


def _heatmap_child(volume, result, out_dir, series_number_base, uids, conn) -> None:
    try:
        conn.send(("ok", _write_heatmaps(volume, result, out_dir, series_number_base, uids)))
    except BaseException as exc:  # reported to the parent, which keeps the other outputs
        logger.debug("heat-map child failed:\n%s", traceback.format_exc())
        conn.send(("error", one_line(exc)))
    finally:
        conn.close()


def _can_fork() -> bool:
    return ("fork" in multiprocessing.get_all_start_methods() and (os.cpu_count() or 1) >= 2
            and not multiprocessing.current_process().daemon)


@dataclass
class WrittenOutputs:
    """What :func:`write_outputs` wrote."""

    #: file name -> SOP Class UID, in the order seg, heat maps, key images, SR, KOS, PDF report
    outputs: dict[str, str]
    #: seconds per step
    timings: dict[str, float]
    #: one line per source-header repair and per object not written (and why)
    warnings: list[str] = field(default_factory=list)
    #: the volume as the writers saw it (repaired identity UIDs; for result.json)
    volume: Volume | None = None


def write_outputs(volume: Volume, result: AnalysisResult, out_dir: Path, *, series_number_base: int = 900,
                  parallel: bool = True, uids: ResultUids | None = None) -> WrittenOutputs:
    """Build and write every result object. ``uids``: see :class:`ResultUids` (default:
    derived from the source series and model, revision 1).

    The source headers are repaired once (:func:`sanitise_volume`) for every builder,
    the forked heat-map writer included. An object that cannot be built or written is
    left out (the SR with the SEG it references, the KOS with its key images) and
    named in ``warnings``; the others are kept.

    Raises OutputError only when no object at all could be built and written."""
    uids = uids or ResultUids.for_analysis(volume, result)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    source = sanitise_volume(volume)
    volume = source.volume
    timings = {"writers.source_header": round(time.perf_counter() - t0, 3)}
    fork = parallel and _can_fork()
    child = conn = None
    if fork:
        ctx = multiprocessing.get_context("fork")
        conn, child_conn = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_heatmap_child, args=(volume, result, out_dir, series_number_base, uids, child_conn),
                            name="ct-ai-node-heatmaps", daemon=True)
        child.start()
        child_conn.close()
    failures: list[str] = []
    try:
        start = time.perf_counter()
        built = build_outputs(volume, result, series_number_base=series_number_base, heatmaps=False, uids=uids,
                              sanitise=False)
        failures.extend(built.warnings)
        timings.update({f"writers.{k}": v for k, v in built.timings_s.items()})
        t_write = time.perf_counter()
        own = _write_own(built, out_dir, failures)
        timings["write_files"] = round(time.perf_counter() - t_write, 3)
        try:
            heat = _receive(child, conn) if fork else _write_heatmaps(volume, result, out_dir, series_number_base, uids)
        except Exception as exc:  # noqa: BLE001 - the other outputs are kept
            logger.warning("heat-map series not written: %s", type(exc).__name__)
            failures.append(f"heat-map series not written: {one_line(exc)}")
            for path in out_dir.glob("heatmap_*.dcm"):
                path.unlink(missing_ok=True)
            heat = {"outputs": {}, "timings": {}}
        timings.update({("writers.heatmap" if k == "heatmap" else k): v for k, v in heat["timings"].items()})
        timings["outputs_wall"] = round(time.perf_counter() - start, 3)
    finally:
        if child is not None and child.is_alive():
            child.kill()
            child.join()
    seg = {n: c for n, c in own.items() if n == "seg.dcm"}
    outputs = {**seg, **heat["outputs"], **{n: c for n, c in own.items() if n != "seg.dcm"}}
    if not outputs:
        raise OutputError("no result object could be built or written: " + "; ".join(failures))
    return WrittenOutputs(outputs, timings, [*source.notes, *failures], volume)


def _write_own(built: OutputSet, out_dir: Path, failures: list[str]) -> dict[str, str]:
    """Write ``built``; a file that cannot be written is left out, with what depends on
    it (the SR on the SEG, the KOS on the key images)."""
    own: dict[str, str] = {}
    unwritten: set[str] = set()
    for name, ds in built.named():
        if name == "sr.dcm" and "seg" in unwritten:
            failures.append("SR not written: it references the SEG, which could not be written")
            continue
        if name == "ko.dcm" and "key" in unwritten:
            failures.append("key object selection not written: a key image it selects could not be written")
            continue
        try:
            write_dataset(ds, out_dir / name)
        except Exception as exc:  # noqa: BLE001 - the other outputs are kept
            logger.warning("%s not written: %s", name, type(exc).__name__)
            failures.append(f"{name} not written: {one_line(exc)}")
            unwritten.add(name.split("_")[0].removesuffix(".dcm"))
            (out_dir / f".{name}.tmp").unlink(missing_ok=True)
            continue
        own[name] = str(ds.SOPClassUID)
    return own


def _receive(child, conn) -> dict:
    try:
        status, payload = conn.recv()
    except EOFError:
        child.join()
        raise OutputError(f"the writer process ended without an answer (exit code {child.exitcode})") from None
    child.join()
    if status != "ok":
        raise OutputError(payload)
    return payload
