"""Command line: ``ct-ai-node analyze | serve | demo | train | evaluate | pipelines | check-config | rules test``."""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ct_ai_node import __version__
from ct_ai_node.logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ct-ai-node: chest-CT AI node beside a PACS.")
err = Console(stderr=True)

EXIT_REJECTED = 2
EXIT_FAILED = 3


def _logging(verbose: bool) -> None:
    configure_logging(logging.DEBUG if verbose else logging.WARNING)


@app.command()
def analyze(
    input_dir: Path = typer.Argument(..., help="folder with the DICOM files (searched recursively)"),
    out: Path = typer.Option(..., "--out", help="folder for the result .dcm files and result.json"),
    pipeline: str = typer.Option("radlogics", help="pipeline name (see `ct-ai-node pipelines`)"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    lungs: str = typer.Option("unet", help="lung segmentation: unet (default, measured better) or classical"),
    infection: str = typer.Option("unet", help="suspected-infection mask and case result: unet (the opacity U-Net "
                                               "and its three-class case model) or heatmap (the method's map and "
                                               "decision)"),
    weights_dir: Optional[Path] = typer.Option(None, help="folder with a site's own weights + manifest.json"),
    max_thickness_mm: float = typer.Option(5.0, help="thickest slices accepted (mm)"),
    min_slices: int = typer.Option(20, help="fewest slices a series must have"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Analyse one chest CT series and write SEG, heat-map SC, key images, SR and result.json."""
    from ct_ai_node.analyze import AnalyzeOptions, analyze_folder, write_result
    from ct_ai_node.result import ResultDocument

    _logging(verbose)
    from pydantic import ValidationError

    from ct_ai_node.rules.selection import SelectionPolicy

    try:
        policy = SelectionPolicy(max_thickness_mm=max_thickness_mm, max_spacing_mm=max(max_thickness_mm, 5.0),
                                 min_slices=min_slices)
    except ValidationError as exc:
        first = exc.errors()[0]
        typer.echo(f"invalid option {first['loc'][0]}: {first['msg']}", err=True)
        raise typer.Exit(EXIT_REJECTED)
    opts = AnalyzeOptions(pipeline=pipeline, device=device, lungs=lungs, infection=infection, weights_dir=weights_dir,
                          selection=policy)
    try:
        with err.status("analysing ...") as status:
            doc = analyze_folder(input_dir, out, opts, report=lambda stage: status.update(f"analysing: {stage} ..."))
    except Exception as exc:  # a bug, not bad input: one line here, the traceback in the output folder
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.log").write_text(traceback.format_exc())
        reason = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
        write_result(ResultDocument(status="failed", reason=reason, version=__version__), out)
        typer.echo(f"failed: {reason} (traceback in {out / 'error.log'})", err=True)
        raise typer.Exit(EXIT_FAILED)
    if doc.status == "rejected":
        typer.echo(f"rejected: {doc.reason}", err=True)
        raise typer.Exit(EXIT_REJECTED)
    if doc.status == "failed":
        typer.echo(f"failed: {doc.reason}", err=True)
        raise typer.Exit(EXIT_FAILED)
    _print_summary(doc, out)


def _print_summary(doc, out: Path) -> None:
    from rich.table import Table

    con = Console()
    t = Table(title="ct-ai-node result - NOT FOR DIAGNOSTIC USE", caption=f"model trained on {doc.trained_on or 'synthetic phantoms only'}",
              show_header=False)
    rows = [("result", f"{doc.label} (p = {doc.probability:.3f}, threshold {doc.threshold})")]
    if doc.case_class_text:
        probs = ", ".join(f"{name} {p:.3f}" for name, p in doc.class_probabilities.items())
        rows.append(("case class", doc.case_class_text + (f" ({probs})" if probs else "")))
    rows += [
        ("positive slices", f"{len(doc.positive_slices)} ({doc.positive_slice_ratio:.1%} of lung slices)"),
        ("lung volume", f"{doc.lung_volume_ml:.0f} ml (R {doc.right_lung_volume_ml:.0f}, L {doc.left_lung_volume_ml:.0f})"),
        ("suspected infection", f"{doc.lesion_volume_ml:.1f} ml ({doc.involvement_percent:.1f} % of lung)"),
    ]
    if doc.ggo_volume_ml is not None and doc.consolidation_volume_ml is not None:
        rows.append(("opacities", f"ground-glass {doc.ggo_volume_ml:.1f} ml, "
                                  f"consolidation {doc.consolidation_volume_ml:.1f} ml"))
    rows += [
        ("Corona score", f"{doc.corona_score_ml:.1f} cm³"),
        ("pipeline", f"{doc.pipeline}: {doc.algorithm}"),
        ("outputs", f"{len(doc.outputs)} DICOM files in {out}"),
        ("time", f"{doc.timings_s.get('total', 0):.1f} s"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)
    for w in doc.warnings:
        con.print(f"[yellow]warning[/yellow]: {w}")


@app.command()
def pipelines() -> None:
    """List the selectable pipelines."""
    from ct_ai_node.pipeline.methods import DEFAULT_PIPELINE, available_pipelines

    for spec in available_pipelines():
        mark = " (default)" if spec.name == DEFAULT_PIPELINE else ""
        missing = spec.missing_weights()
        state = f" [no weights yet: {', '.join(missing)}; see `ct-ai-node train --help`]" if missing else ""
        typer.echo(f"{spec.name}{mark}: {spec.description}{state}")


def _phantom_shape(text: str):
    """--shape: "full" (None: drawn realistic geometries) or z,y,x."""
    return None if text == "full" else tuple(int(v) for v in text.split(","))


@app.command()
def train(
    method: str = typer.Argument("default", help="default (method A + lung U-Net), ctnet, dual-sampling, "
                                                 "resnext-lstm or infection"),
    out: Path = typer.Option(Path("ct_ai_node/models/weights"), help="folder for the weights and manifest"),
    cases: int = typer.Option(300, help="training phantoms"),
    val_cases: int = typer.Option(60, help="validation phantoms (calibration, model selection)"),
    epochs: Optional[int] = typer.Option(None, help="epochs (default: each method's own)"),
    lung_epochs: int = typer.Option(4, help="lung U-Net epochs (METHOD default)"),
    shape: str = typer.Option("full", help="phantom shape z,y,x; 'full': drawn realistic geometries; "
                                                 "0,256,256: the same geometries on a 256 matrix (cheaper)"),
    cache_dir: Optional[Path] = typer.Option(None, help="cache of prepared phantoms (methods C, D, infection, lungs)"),
    device: str = typer.Option("auto"),
    workers: Optional[int] = typer.Option(None, help="phantom generator processes (METHOD default)"),
    data: Optional[Path] = typer.Option(None, help="a site's labelled scans instead of phantoms: a folder with "
                                                   "labels.csv (scan,label[,lung_mask,lesion_mask,split]); "
                                                   "DICOM series folders or NIfTI files"),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE: change one of METHOD's training "
                                                                     "settings (repeatable), e.g. --set width=16 "
                                                                     "--set time_budget_s=300"),
    backgrounds: Optional[Path] = typer.Option(None, help="real chest CT series (DICOM folders, NIfTI files) under "
                                                          "this folder become extra cases with synthetic lesions "
                                                          "inserted, and real negatives"),
    hold_out: Optional[List[str]] = typer.Option(None, "--hold-out", help="a background (name relative to "
                                                                          "--backgrounds, or a folder above it) "
                                                                          "kept out of training (repeatable)"),
) -> None:
    """Train a model on synthetic phantoms (seeds never from the held-out test range), or
    on a site's own labelled scans (--data), and write fp16 safetensors + manifest
    entries into --out."""
    from ct_ai_node.analyze import resolve_device
    from ct_ai_node.errors import InputRejected
    from ct_ai_node.training.methods import TRAINABLE, fit_cases, train_method

    if method not in TRAINABLE:
        typer.echo(f"unknown METHOD {method!r}; one of: {', '.join(TRAINABLE)}", err=True)
        raise typer.Exit(EXIT_REJECTED)
    dims = _phantom_shape(shape)
    try:
        if method == "default":
            from ct_ai_node.training.train import TrainSettings, train_default_models

            settings = TrainSettings(n_train_cases=cases, n_val_cases=val_cases, classifier_epochs=epochs or 12,
                                     lung_epochs=lung_epochs, shape=dims, workers=workers)
            report = train_default_models(out, settings, resolve_device(device), log=err.print,
                                          cases=fit_cases(cases, val_cases, data))
        else:
            report = train_method(method, out, resolve_device(device), cases=cases, val_cases=val_cases,
                                  epochs=epochs, shape=dims, cache_dir=cache_dir, log=err.print, data_dir=data,
                                  workers=workers, overrides=overrides or (), backgrounds=backgrounds,
                                  held_out=hold_out or ())
    except InputRejected as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_REJECTED)
    typer.echo(json.dumps(report, indent=2, default=str))


@app.command()
def prepare(
    methods: str = typer.Option("dual-sampling,resnext-lstm", help="methods whose cache to fill, separated by commas: "
                                                                   "dual-sampling, resnext-lstm, infection"),
    cache_dir: Path = typer.Option(..., help="the cache folder `ct-ai-node train --cache-dir` then reads"),
    cases: int = typer.Option(300, help="training phantoms"),
    val_cases: int = typer.Option(60, help="validation phantoms"),
    shape: str = typer.Option("full", help="phantom shape z,y,x; 'full': drawn realistic geometries; "
                                                 "0,256,256: the same geometries on a 256 matrix (cheaper)"),
    workers: Optional[int] = typer.Option(None, help="phantom generator processes (default: one per core)"),
    data: Optional[Path] = typer.Option(None, help="a site's labelled scans instead of phantoms (as for train)"),
) -> None:
    """Generate each training and validation phantom once and cache what every METHOD's
    trainer reads, so that several trainers can then run side by side from the cache."""
    from ct_ai_node.errors import InputRejected
    from ct_ai_node.training.budget import prepare_caches
    from ct_ai_node.training.methods import fit_cases

    names = [m.strip() for m in methods.split(",") if m.strip()]
    dims = _phantom_shape(shape)
    try:
        train_refs, val_refs = fit_cases(cases, val_cases, data)
        t0 = time.time()
        n = prepare_caches(names, list(train_refs) + list(val_refs), cache_dir, dims, workers)
    except (InputRejected, ValueError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_REJECTED)
    typer.echo(f"{n} cases prepared for {', '.join(names)} in {cache_dir} ({time.time() - t0:.0f} s)")


@app.command()
def evaluate(
    out: Path = typer.Option(Path("out/evaluation"), help="folder for the per-case table and summary"),
    cases: int = typer.Option(24, help="held-out phantoms (seeds never used in training)"),
    first_seed: int = typer.Option(90_000, help="first held-out phantom seed (90000 and up; a fresh set for a "
                                                "figure once an earlier one has guided a change)"),
    device: str = typer.Option("auto"),
    lungs: str = typer.Option("unet"),
    infection: str = typer.Option("unet", help="infection mask and case result: unet (opacity U-Net + three-class "
                                               "case model) or heatmap (each method's map and decision)"),
    pipeline: str = typer.Option("radlogics", help="one pipeline, or several separated by commas: side by side "
                                                   "on the same phantoms ('all': every registered pipeline)"),
    weights_dir: Optional[Path] = typer.Option(None, help="weights folder (default: the bundled weights)"),
    shape: Optional[str] = typer.Option(None, help="phantom shape z,y,x (default: drawn per case, full size)"),
    workers: Optional[int] = typer.Option(None, help="phantom generator processes"),
    data: Optional[Path] = typer.Option(None, help="a site's labelled scans instead of phantoms (labels.csv as for "
                                                   "train; its 'test' rows, or every row when none is marked)"),
    real: Optional[Path] = typer.Option(None, help="instead: every real chest CT series under this folder, one row "
                                                   "each (probability, class, opacity ml)"),
    hold_out: Optional[List[str]] = typer.Option(None, "--hold-out", help="with --real: series that were held out "
                                                                          "of training (named in the rows)"),
    lobes: bool = typer.Option(False, "--lobes", help="instead: the lobe U-Net's Dice per lobe on held-out "
                                                      "phantoms (true lungs and the lung U-Net's)"),
) -> None:
    """Evaluate pipelines on held-out synthetic phantoms (or a site's labelled scans) and print
    the metrics (AUC, sensitivity, specificity, F1, lung and lesion Dice, volume errors,
    pointing game, seconds per case); with --real, list every real series' result; with
    --lobes, the lobe segmentation's Dice."""
    from ct_ai_node.analyze import resolve_device
    from ct_ai_node.errors import InputRejected

    if lobes:
        from ct_ai_node.training.train_lobes import evaluate_lobes

        dims = tuple(int(v) for v in shape.split(",")) if shape else None
        try:
            res = evaluate_lobes(list(range(first_seed, first_seed + cases)), resolve_device(device), weights_dir,
                                 shape=dims, log=err.print)
        except ValueError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(EXIT_REJECTED)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lobes.json").write_text(json.dumps(res, indent=2) + "\n")
        typer.echo(json.dumps(res["summary"], indent=2))
        return

    if real is not None:
        from ct_ai_node.training.evaluate_real import evaluate_real

        rows = evaluate_real(real, out, resolve_device(device), pipeline=pipeline, weights_dir=weights_dir,
                             held_out=tuple(hold_out or ()), log=err.print)
        typer.echo(json.dumps(rows, indent=2))
        return

    site_cases = None
    if data is not None:
        from ct_ai_node.training.site_data import read_site_cases, split_cases

        try:
            rows = read_site_cases(data)
        except InputRejected as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(EXIT_REJECTED)
        site_cases = split_cases(rows, "test") or rows

    dims = tuple(int(v) for v in shape.split(",")) if shape else None
    names = [p.strip() for p in pipeline.split(",") if p.strip()]
    if names == ["all"]:
        from ct_ai_node.pipeline.methods import available_pipelines

        names = [spec.name for spec in available_pipelines()]
    from ct_ai_node.training.data import TEST_SEED0

    if first_seed < TEST_SEED0:
        typer.echo(f"--first-seed {first_seed}: held-out seeds start at {TEST_SEED0}", err=True)
        raise typer.Exit(EXIT_REJECTED)
    if len(names) == 1:
        from ct_ai_node.training.evaluate import evaluate_pipeline

        summary = evaluate_pipeline(out, cases, resolve_device(device), pipeline=names[0], lungs=lungs, seed0=first_seed,
                                    log=err.print, weights_dir=weights_dir, shape=dims, workers=workers,
                                    infection=infection, cases=site_cases)
    else:
        from ct_ai_node.training.compare import compare_pipelines

        res = compare_pipelines(out, names, cases, resolve_device(device), lungs=lungs, shape=dims, infection=infection,
                                seed0=first_seed,
                                weights_dir=weights_dir, workers=workers, log=err.print, cases=site_cases)
        summary = {"summaries": res["summaries"], "skipped": res["skipped"]}  # the rows are in --out
    typer.echo(json.dumps(summary, indent=2, default=float))


@app.command()
def calibrate(
    pipeline: str = typer.Argument(..., help="radlogics or ctnet (their case decision), resnext-lstm "
                                   "(its infection-mask heat level, on phantoms), or pattern (the three-class "
                                   "case model of the infection U-Net)"),
    cases: int = typer.Option(60, help="validation phantoms (seeds never used for training or testing)"),
    data: Optional[Path] = typer.Option(None, help="a site's labelled scans instead (labels.csv; its 'val' rows)"),
    weights_dir: Optional[Path] = typer.Option(None, help="weights folder to update (default: the bundled weights)"),
    out: Path = typer.Option(Path("out/calibration"), help="folder for the per-case rows"),
    device: str = typer.Option("auto"),
    backgrounds: Optional[Path] = typer.Option(None, help="pattern: real chest CT series under this folder add "
                                                          "cases with inserted lesions and real negatives"),
    hold_out: Optional[List[str]] = typer.Option(None, "--hold-out", help="pattern: a background kept out "
                                                                          "(repeatable)"),
    workers: Optional[int] = typer.Option(None, help="pattern: processes computing the cases"),
    rows: Optional[Path] = typer.Option(None, help="pattern: refit from the cases of an earlier run "
                                                   "(its pattern_calibration_cases.json, same weights)"),
) -> None:
    """Fit a slice-ratio pipeline's case decision (ratio threshold, probability slope),
    method D's infection-mask heat level, or (``pattern``) the three-class case model read
    from the infection U-Net's opacities, on validation cases and write it into the weight
    file (tensors unchanged, new hash)."""
    from ct_ai_node.analyze import resolve_device
    from ct_ai_node.errors import InputRejected
    from ct_ai_node.training.calibrate import calibrate_pipeline

    if pipeline == "pattern":
        from ct_ai_node.training.calibrate_pattern import calibrate_pattern

        try:
            report = calibrate_pattern(cases=cases, backgrounds=backgrounds, held_out=tuple(hold_out or ()),
                                       weights_dir=weights_dir, out_dir=out, workers=workers, rows_file=rows,
                                       log=err.print)
        except (InputRejected, ValueError) as exc:
            typer.echo(" ".join(str(exc).split()), err=True)
            raise typer.Exit(EXIT_REJECTED)
        typer.echo(json.dumps(report["report"], indent=2, default=float))
        return
    site_cases = None
    try:
        if data is not None:
            from ct_ai_node.training.site_data import read_site_cases, split_cases

            site_cases = split_cases(read_site_cases(data), "val")
            if not site_cases:
                raise InputRejected(f"--data {data}: no validation rows (split column 'val', or at least 5 rows)")
        report = calibrate_pipeline(pipeline, resolve_device(device), cases=cases, site_cases=site_cases,
                                    weights_dir=weights_dir, out_dir=out, log=err.print)
    except (InputRejected, ValueError) as exc:
        typer.echo(" ".join(str(exc).split()), err=True)
        raise typer.Exit(EXIT_REJECTED)
    typer.echo(json.dumps(report, indent=2, default=float))


def _config_or_exit(path: Path, check_files: bool = True):
    """The node configuration, or its problems on stderr (one line each) and exit 2."""
    from ct_ai_node.config import ConfigError, load_config

    try:
        return load_config(path, check_files=check_files)
    except ConfigError as exc:
        for line in exc.problems:
            typer.echo(line, err=True)
        raise typer.Exit(EXIT_REJECTED)


@app.command("check-config")
def check_config(
    file: Path = typer.Argument(..., help="node configuration (YAML)"),
) -> None:
    """Check a node configuration: one line per problem (exit 2), or OK and a summary."""
    config = _config_or_exit(file)
    typer.echo(f"OK: {config.summary()}")


@app.command()
def serve(
    config_file: Path = typer.Option(..., "--config", "-c", help="node configuration (YAML)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    """Run the node: Storage SCP, routing rules, job queue, workers, senders (until Ctrl-C / SIGTERM)."""
    from ct_ai_node.node import Node

    config = _config_or_exit(config_file)
    level = logging.DEBUG if verbose else logging.INFO
    configure_logging(level)
    err.print(f"ct-ai-node {__version__}: {config.summary()}; storage {config.storage.root}")
    try:
        Node(config, log_level=level, config_path=config_file, config_base=Path.cwd()).serve_forever()
    except OSError as exc:  # e.g. the port is taken
        typer.echo(f"cannot start the node: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED)


@app.command()
def worker(
    config_file: Path = typer.Option(..., "--config", "-c", help="node configuration (YAML)"),
    count: Optional[int] = typer.Option(None, "--count", min=1, help="worker processes (default workers.count)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    """Run only analysis and delivery workers (a worker host: no listener, no dispatcher),
    taking jobs from the shared queue (queue: {kind: postgres}) until Ctrl-C / SIGTERM."""
    import os
    import socket

    from ct_ai_node.node.worker_pool import WorkerPool

    config = _config_or_exit(config_file)
    n = count or config.workers.count
    if n < 1:
        typer.echo("workers.count is 0: give --count N (a worker host runs at least one worker)", err=True)
        raise typer.Exit(EXIT_REJECTED)
    if config.queue.kind == "sqlite":
        err.print(f"note: queue kind sqlite: these workers share {config.storage.db_path} with a node on "
                  "this host only; workers on other hosts need queue: {kind: postgres}")
    level = logging.DEBUG if verbose else logging.INFO
    configure_logging(level)
    for folder in (config.storage.root, config.storage.outbox_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    source = config.workers.fetch_from or f"the spool in {config.storage.spool_dir}"
    err.print(f"ct-ai-node {__version__}: {n} worker(s), series from {source}, device {config.workers.device}")
    # lease owners must differ between hosts and between worker commands on one host
    name = f"{socket.gethostname().split('.')[0][:32]}-{os.getpid()}"
    prune = None
    if config.retention.enabled:
        from functools import partial

        from ct_ai_node.jobqueue.factory import open_queue
        from ct_ai_node.node.retention import prune_worker_outbox

        # this host's results, once delivered and past their grace (the supervisor's own connection)
        prune = partial(prune_worker_outbox, config.storage.outbox_dir, open_queue(config), config.retention)
    WorkerPool(config, n, level, name=name, housekeeping=prune,
               housekeeping_s=config.retention.interval_s).serve_forever()


@app.command()
def demo(
    pacs: str = typer.Option("builtin", "--pacs", help="builtin (a local Storage SCP) or orthanc (a real Orthanc)"),
    series: Optional[Path] = typer.Option(None, "--series", help="DICOM folder to send (default: the bundled sample)"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="keep everything here (default: a temp folder)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="node logs on stderr"),
) -> None:
    """Start the node and a local PACS, send the sample series, wait for the results, print a summary."""
    from ct_ai_node.demo import SAMPLE_SERIES, run_demo, summary_lines

    if pacs not in ("builtin", "orthanc"):
        typer.echo(f"--pacs: {pacs!r} is not one of builtin, orthanc", err=True)
        raise typer.Exit(EXIT_REJECTED)
    configure_logging(logging.INFO if verbose else logging.WARNING)
    try:
        report = run_demo(pacs, series or SAMPLE_SERIES, workdir, say=lambda m: err.print(m),
                          log_level=logging.INFO if verbose else logging.WARNING)
    except (FileNotFoundError, OSError, TimeoutError, RuntimeError) as exc:
        typer.echo(f"demo could not run: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(EXIT_FAILED)
    for line in summary_lines(report):
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


jobs_app = typer.Typer(no_args_is_help=True, help="See and re-run the node's jobs (its queue database).")
app.add_typer(jobs_app, name="jobs")


def _queue_of(config_file: Path):
    from ct_ai_node.jobqueue.factory import open_queue

    config = _config_or_exit(config_file, check_files=False)
    if config.queue.kind == "sqlite" and not config.storage.db_path.is_file():
        typer.echo(f"no job database at {config.storage.db_path} (has the node run here?)", err=True)
        raise typer.Exit(EXIT_REJECTED)
    return open_queue(config, reconnect_s=10)


@jobs_app.command("list")
def jobs_list(
    config_file: Path = typer.Option(..., "--config", "-c", help="node configuration (YAML)"),
    state: Optional[str] = typer.Option(None, help="queued, running, sending, done, failed or dead"),
    limit: int = typer.Option(50, help="newest first, at most this many"),
) -> None:
    """One line per job: id, kind, state, attempts, what it is about, and its last error."""
    import datetime

    from ct_ai_node.jobqueue import JobState

    if state is not None and state not in {s.value for s in JobState}:
        typer.echo(f"--state: {state!r} is not one of {', '.join(s.value for s in JobState)}", err=True)
        raise typer.Exit(EXIT_REJECTED)
    queue = _queue_of(config_file)
    counts = queue.counts()
    typer.echo("  ".join(f"{k} {v}" for k, v in counts.items() if v) or "no jobs")
    for job in queue.list(state=state, limit=limit):
        when = datetime.datetime.fromtimestamp(job.updated_at).strftime("%Y-%m-%d %H:%M:%S")
        what = job.payload.get("destination") or job.payload.get("rule") or ""
        parent = f" parent {job.parent_id}" if job.parent_id else ""
        error = f"  {job.last_error}" if job.last_error else ""
        typer.echo(f"{job.id:6d} {job.kind:8s} {str(job.state):8s} {job.attempts}/{job.max_attempts} {when} "
                   f"{what}{parent}{error}")


@jobs_app.command("requeue")
def jobs_requeue(
    job_id: int = typer.Argument(..., help="the job to run again (see `jobs list`)"),
    config_file: Path = typer.Option(..., "--config", "-c", help="node configuration (YAML)"),
) -> None:
    """Run a failed or dead job again (attempts start from zero); a running node picks it up."""
    from ct_ai_node.jobqueue import JobNotFound, JobStateError
    from ct_ai_node.node.job_actions import requeue

    queue = _queue_of(config_file)
    try:
        typer.echo(requeue(queue, job_id))
    except (JobNotFound, JobStateError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_REJECTED)


web_app = typer.Typer(no_args_is_help=True, help="Users and API tokens of the web app (docs/node.md, \"Web app\").")
app.add_typer(web_app, name="web")


@web_app.command("hash-password")
def web_hash_password(
    password: str = typer.Option(..., prompt=True, hide_input=True, confirmation_prompt=True,
                                 help="asked for when not given (better: it stays out of the shell history)"),
) -> None:
    """Print an argon2 hash for ``web.users[].password_hash`` (the password itself is never stored)."""
    from ct_ai_node.web.auth import hash_password

    try:
        typer.echo(hash_password(password))
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_REJECTED)


@web_app.command("new-token")
def web_new_token() -> None:
    """Make an API token: the token for the script, its hash for ``web.api_tokens[].token_hash``."""
    from ct_ai_node.web.auth import new_token

    token, digest = new_token()
    typer.echo(f"token (give it to the script; shown once): {token}")
    typer.echo(f"token_hash (for the configuration):        {digest}")


rules_app = typer.Typer(no_args_is_help=True, help="Try the routing rules of a node configuration.")
app.add_typer(rules_app, name="rules")


@rules_app.command("test")
def rules_test(
    folder: Path = typer.Argument(..., help="folder with DICOM files (searched recursively)"),
    config_file: Path = typer.Option(..., "--config", help="node configuration (YAML)"),
    calling_ae: str = typer.Option("", "--calling-ae", help="calling AE title to assume (the sender)"),
    called_ae: Optional[str] = typer.Option(None, "--called-ae", help="called AE title (default: the node's)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Route every series of a folder as the node would, and say why."""
    from ct_ai_node.rules.routing import describe_action, facts_from_datasets, route
    from ct_ai_node.volume.reader import scan_folder

    _logging(verbose)
    config = _config_or_exit(config_file, check_files=False)
    if not folder.exists():
        typer.echo(f"{folder}: no such file or folder", err=True)
        raise typer.Exit(EXIT_REJECTED)
    scan = scan_folder(folder)
    if not scan.series:
        typer.echo(f"no DICOM series among {scan.n_files} files", err=True)
        raise typer.Exit(EXIT_REJECTED)
    called = called_ae if called_ae is not None else config.node.ae_title
    decisions = []
    for instances in scan.series.values():
        headers = [inst.header for inst in instances]
        # the scan keeps a few attributes only; rules may test any: read the first header whole
        first = _read_full_header(instances[0].path)
        if first is not None:
            headers[0] = first
        facts = facts_from_datasets(headers, calling_ae=calling_ae, called_ae=called)
        decisions.append((facts, route(config.rules, config.routing, facts)))
    decisions.sort(key=lambda fd: _series_order(fd[0]))
    for facts, decision in decisions:
        typer.echo(f"{facts.label}: {facts.instance_count} instances, {facts.orientation}")
        for action in decision.actions:
            typer.echo(f"  => {action.rule}: {describe_action(action)}")
        for line in decision.explanation:
            typer.echo(f"  {line}")
    if scan.skipped:
        typer.echo(f"{len(scan.skipped)} file(s) skipped (not DICOM, or damaged)")


def _read_full_header(path: Path):
    """Whole header of one file (no pixel data), or None when it cannot be read."""
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - the scanned header is used instead
        return None


def _series_order(facts) -> tuple:
    number = facts.tags.get("SeriesNumber")
    return (number if isinstance(number, float) else float("inf"), facts.label)


@app.callback(invoke_without_command=True)
def _main(version: bool = typer.Option(False, "--version", help="print the version")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


if __name__ == "__main__":  # pragma: no cover
    app(prog_name="ct-ai-node")
