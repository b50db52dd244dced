"""``ct-ai-node analyze``: a folder of DICOM files in, result objects and
``result.json`` out. This is the thin edge around the pure stages:

    folder -> scan + select series -> volume -> pipeline -> writers -> files

Bad input never raises out of :func:`analyze_folder`: it returns a rejected
:class:`ResultDocument` with a one-line reason (and writes it to ``result.json``).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ct_ai_node import __version__
from ct_ai_node.errors import CtAiNodeError, InputRejected
from ct_ai_node.pipeline.methods import DEFAULT_PIPELINE
from ct_ai_node.pipeline.model_cache import ModelCache, build_models
from ct_ai_node.pipeline.run import PipelineSettings, analyse_volume
from ct_ai_node.result import ResultDocument, result_document
from ct_ai_node.writers.common import ReportRef, ResultUids

logger = logging.getLogger(__name__)

#: lung segmentation used unless asked otherwise: it measured better (docs/models.md)
DEFAULT_LUNGS = "unet"


@dataclass
class AnalyzeOptions:
    pipeline: str = DEFAULT_PIPELINE
    device: str = "auto"
    lungs: str = DEFAULT_LUNGS
    weights_dir: Path | None = None
    series_number_base: int = 900
    #: which series qualify (ct_ai_node.rules.selection.SelectionPolicy); default when None
    selection: object | None = None
    pipeline_settings: PipelineSettings = field(default_factory=PipelineSettings)
    #: where the "suspected infection" mask comes from: the trained opacity U-Net (and its
    #: three-class case model), or the method's heat map (the case result is then the method's)
    infection: str = "unet"
    #: build and write the heat-map series in a forked process beside the other outputs
    parallel_writers: bool = True
    #: which revision of the series' results this is, and the report it replaces
    #: (``ct_ai_node.node.revisions``); result UIDs derive from it
    revision: int = 1
    predecessor: ReportRef | None = None
    #: the comparison with the patient's prior study (``node.priors.PriorLookup``): asked
    #: between the pipeline and the writers, told afterwards; None: no comparison
    priors: object | None = None
    #: analyse only (result.json, no result objects): a prior analysed for a comparison
    findings_only: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputRejected("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def write_result(doc: ResultDocument, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "result.json"
    tmp = out_dir / ".result.json.tmp"
    tmp.write_text(doc.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _return_freed_memory() -> None:
    """glibc keeps freed heap memory (the loader's per-slice buffers, freed by several
    threads) for reuse by small allocations; the analysis allocates large arrays, which do
    not reuse it. ``malloc_trim`` gives it back (about 300 MB for a 600-slice series)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


@contextmanager
def _stage(timings: dict[str, float], name: str, report: Callable[[str], None] | None):
    if report:
        report(name)
    t = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t, 3)


def analyze_folder(input_dir: Path, out_dir: Path, options: AnalyzeOptions | None = None,
                   report: Callable[[str], None] | None = None, models: ModelCache | None = None) -> ResultDocument:
    """Run the whole analysis; always writes ``out_dir/result.json``. ``models``: networks
    kept loaded between analyses (a worker's); built for this one when None."""
    from ct_ai_node.volume import load_series_from_folder
    from ct_ai_node.output_folder import WrittenOutputs, write_outputs

    opts = options or AnalyzeOptions()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    out_dir = Path(out_dir)
    try:
        device = resolve_device(opts.device)
        with _stage(timings, "load", report):
            volume, selection, scan = load_series_from_folder(Path(input_dir), opts.selection)
            volume.release_source_pixels()  # the writers take the headers; hu holds the image
            _return_freed_memory()
        skipped = [why for _key, why in selection.skipped]
        with _stage(timings, "models", report):
            wanted = (opts.pipeline, opts.lungs, opts.infection, device, opts.weights_dir)
            loaded = models.get(*wanted) if models is not None else build_models(*wanted)
        with _stage(timings, "pipeline", report):
            result = analyse_volume(volume, loaded.method, loaded.lungs, opts.pipeline_settings, opts.pipeline,
                                    loaded.infection, loaded.lobes)
        if opts.priors is not None:
            with _stage(timings, "prior", report):
                try:
                    result.comparison, notes = opts.priors.compare(volume, result)
                except Exception as exc:  # noqa: BLE001 - the analysis stands without a comparison
                    logger.warning("no comparison with a prior study (%s)", type(exc).__name__)
                    result.comparison, notes = None, [f"no comparison with a prior study: {type(exc).__name__}: "
                                                      + " ".join(str(exc).split())[:200]]
                result.warnings.extend(notes)
        with _stage(timings, "outputs", report):
            if opts.findings_only:
                written = WrittenOutputs(outputs={}, timings={}, volume=volume)
            else:
                uids = ResultUids.for_analysis(volume, result, opts.revision, opts.predecessor)
                written = write_outputs(volume, result, out_dir, series_number_base=opts.series_number_base,
                                        parallel=opts.parallel_writers, uids=uids)
    except InputRejected as exc:
        # reasons name series by number and description (free text): result.json has them
        logger.info("analysis rejected (reason in result.json)")
        logger.debug("analysis rejected: %s", exc.reason)
        doc = ResultDocument(status="rejected", reason=exc.reason, pipeline=opts.pipeline, version=__version__,
                             timings_s=timings)
        write_result(doc, out_dir)
        return doc
    except CtAiNodeError as exc:
        reason = " ".join(str(exc).split())
        logger.error("analysis failed: %s (reason in result.json)", type(exc).__name__)
        logger.debug("analysis failed: %s", reason)
        doc = ResultDocument(status="failed", reason=reason, pipeline=opts.pipeline, version=__version__,
                             timings_s=timings)
        write_result(doc, out_dir)
        return doc
    stage_times = {**{f"pipeline.{k}": v for k, v in result.timings_s.items()},
                   **written.timings, **timings}
    stage_times["total"] = round(time.perf_counter() - t_all, 3)
    # the volume as the writers saw it (repaired UIDs); their repairs and failures are warnings
    doc = result_document(written.volume or volume, result, written.outputs, stage_times, skipped, __version__,
                          extra_warnings=written.warnings)
    doc.revision = opts.revision
    doc.predecessor_sr = opts.predecessor.sop_instance_uid if opts.predecessor else None
    write_result(doc, out_dir)
    if opts.priors is not None:
        try:
            opts.priors.record(volume, result)
        except Exception as exc:  # noqa: BLE001 - the results stand; only a later comparison misses this one
            logger.warning("this study was not added to the patient history (%s)", type(exc).__name__)
    return doc
