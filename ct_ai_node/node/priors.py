"""The prior study of this one, for the comparison: from the node's history, or from a PACS.

``PriorLookup`` is what ``analyze_folder`` calls between the pipeline and the writers
(``AnalyzeOptions.priors``): ``compare`` finds the prior and compares (the SR, the caption,
the PDF and result.json then state the change); ``record`` adds this study to the history
once its results are written.

Modes (a rule's ``prior``): ``history`` looks only at studies the node analysed before
(``node/history.py``); ``query`` also asks the rule's ``prior_source`` (C-FIND, or QIDO-RS
for a DICOMweb archive) for a more recent prior CT, retrieves its largest CT series (C-GET,
or WADO-RS), analyses it first with the same
pipeline (no outputs, nothing sent) and keeps its findings in the history. A failure to find
or retrieve a prior never fails the analysis: it becomes a warning in result.json.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from ct_ai_node.config import PriorsSection
from ct_ai_node.ingress.prior_retrieve import DicomwebQuery, PacsQuery, PriorQueryError
from ct_ai_node.node.history import PatientHistory, patient_key
from ct_ai_node.pipeline.comparison import choose_prior, compare, findings_of, study_datetime
from ct_ai_node.pipeline.types import AnalysisResult, PriorComparison, StudyFindings

logger = logging.getLogger(__name__)

#: a prior study whose largest CT series the analysis refuses gets this many series tried
MAX_SERIES_TRIED = 2

#: ``analyse_prior(folder)`` -> a ResultDocument of the series in ``folder`` (no outputs)
AnalysePrior = Callable[[Path], object]


def _text(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


class PriorLookup:
    def __init__(self, history: PatientHistory, settings: PriorsSection, pipeline: str, mode: str = "history",
                 query: PacsQuery | DicomwebQuery | None = None, analyse_prior: AnalysePrior | None = None,
                 scratch: Path | None = None, job_id: int | None = None):
        if mode not in ("history", "query"):
            raise ValueError(f"prior mode {mode!r}: history or query")
        if mode == "query" and (query is None or analyse_prior is None or scratch is None):
            raise ValueError("prior query needs a PACS, a way to analyse the prior and a scratch folder")
        self.history, self.settings, self.pipeline, self.mode = history, settings, pipeline, mode
        self.query, self.analyse_prior, self.scratch, self.job_id = query, analyse_prior, scratch, job_id
        salt = settings.patient_key_salt
        self._salt = salt.get_secret_value() if salt is not None else ""

    def _key(self, header) -> str | None:
        return patient_key(_text(header, "PatientID"), _text(header, "IssuerOfPatientID"), self._salt)

    def _current(self, volume, result: AnalysisResult) -> StudyFindings:
        header = volume.datasets[0]
        when = study_datetime(_text(header, "StudyDate"), _text(header, "StudyTime"))
        return findings_of(result, volume.study_instance_uid, when)

    def compare(self, volume, result: AnalysisResult) -> tuple[PriorComparison | None, list[str]]:
        """This study against its prior, and warnings (one line each) on why there is none
        when one was looked for and something stood in the way."""
        header = volume.datasets[0]
        key = self._key(header)
        if key is None:
            return None, ["no comparison with a prior study: the series has no PatientID"]
        current = self._current(volume, result)
        if current.study_datetime is None:
            return None, ["no comparison with a prior study: the study has no StudyDate"]
        known = self.history.studies(key, self.pipeline)
        prior, source = choose_prior(known, current, self.settings.max_interval_days), "history"
        notes: list[str] = []
        if self.mode == "query":
            try:
                fetched = self._from_pacs(key, header, current, known, prior)
            except PriorQueryError as exc:
                fetched = None
                notes.append(f"no prior study from the PACS: {exc}")
            except Exception as exc:  # noqa: BLE001 - a network or TLS failure: compare with the history
                fetched = None
                logger.warning("prior query failed (%s)", type(exc).__name__)
                notes.append(f"no prior study from the PACS: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            if fetched is not None:
                prior, source = fetched, "pacs"
        if prior is None:
            logger.info("no prior study for this patient (%s)", "history and PACS" if self.mode == "query"
                        else "history")
            return None, notes
        comparison = compare(prior, current, source)
        logger.info("compared with a prior study (%s, %d days earlier): %s", source, comparison.interval_days,
                    comparison.change)
        return comparison, notes

    def record(self, volume, result: AnalysisResult) -> None:
        """Keep this study's findings (after its results were written)."""
        key = self._key(volume.datasets[0])
        if key is not None:
            self.history.record(key, volume.series_instance_uid, self.pipeline, self._current(volume, result),
                                "spool", self.job_id)

    # -- the PACS ------------------------------------------------------------------------

    def _from_pacs(self, key: str, header, current: StudyFindings, known: list[StudyFindings],
                   from_history: StudyFindings | None) -> StudyFindings | None:
        """A prior the PACS holds that is more recent than the history's (None: none, or the
        history already has the most recent one)."""
        issuer = _text(header, "IssuerOfPatientID")
        up_to = current.study_datetime.strftime("%Y%m%d")
        matches = [m for m in self.query.find_studies(_text(header, "PatientID"), up_to)
                   if not (issuer and m.issuer and m.issuer != issuer)]
        candidates = [StudyFindings(study_instance_uid=m.study_instance_uid,
                                    study_datetime=study_datetime(m.study_date, m.study_time),
                                    involvement_percent=0.0, lesion_volume_ml=0.0) for m in matches]
        newest = choose_prior(candidates, current, self.settings.max_interval_days)
        if newest is None:
            return None
        analysed = {s.study_instance_uid for s in known}
        if newest.study_instance_uid in analysed or (
                from_history is not None and from_history.study_datetime >= newest.study_datetime):
            return None  # the history's prior is as recent: no need to retrieve anything
        return self._analyse_from_pacs(key, newest.study_instance_uid, newest.study_datetime)

    def _analyse_from_pacs(self, key: str, study_uid: str, when) -> StudyFindings | None:
        series = [s for s in self.query.find_series(study_uid)
                  if s.instances is None or s.instances <= self.settings.max_prior_instances]
        series.sort(key=lambda s: -1 if s.instances is None else s.instances, reverse=True)
        if not series:
            raise PriorQueryError("the prior study has no CT series small enough to retrieve "
                                  f"(priors.max_prior_instances {self.settings.max_prior_instances})")
        last_reason = ""
        for n, match in enumerate(series[:MAX_SERIES_TRIED]):
            folder = self.scratch / f"prior-{n}"
            try:
                self.query.get_series(study_uid, match.series_instance_uid, folder)
                doc = self.analyse_prior(folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if doc.status == "done":
                findings = findings_of(doc, study_uid, when)
                self.history.record(key, match.series_instance_uid, self.pipeline, findings, "pacs", self.job_id)
                logger.info("prior study retrieved and analysed: %s", doc.label)
                return findings
            last_reason = doc.reason or doc.status
        raise PriorQueryError(f"the prior study's CT series could not be analysed: {last_reason}")
