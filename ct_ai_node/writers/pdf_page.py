"""The one-page PDF report of one analysis (A4 portrait), for readers without a viewer
that shows SEG or SR: what the AI found, one key image, the lobes and the category
suggestion when the pipeline gave them, and what the model is.

Pure: volume + result + UIDs in, PDF bytes out (fpdf2, its built-in Helvetica). The
key image is rendered exactly as the key-image series renders it (``render_slice`` and
the caption helpers), so the PDF never shows a picture the PACS does not have.

Helvetica holds Windows-1252 only. Text from the source header (a patient name in
Cyrillic or kanji) is transliterated where Unicode decomposes it (``é`` -> ``e``) and
replaced by ``?`` otherwise, rather than embedding a font for every script: the name is
in the DICOM header unchanged, and a report must never fail on a name.
"""

from __future__ import annotations

import datetime
import unicodedata
from collections.abc import Iterable

import numpy as np
from fpdf import FPDF
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from ct_ai_node.pipeline.types import CASE_CLASS_TEXT, LOBE_TEXT, AnalysisResult
from ct_ai_node.volume.types import Volume
from ct_ai_node.writers import common
from ct_ai_node.writers.heatmap import HeatStyle, render_slice
from ct_ai_node.writers.secondary_capture import MAX_KEY_IMAGES

TITLE = "AI chest CT analysis"
#: the page's encoding (fpdf2's core fonts); what it cannot hold is transliterated
ENCODING = "cp1252"
SUGGESTION = "AI suggestion for the radiologist"
#: at most this many category features are listed (the page must stay one page)
MAX_FEATURES = 6

_MARGIN = 15.0
_WIDTH = 210.0 - 2 * _MARGIN
_RED = (170, 0, 0)
_GREY = (90, 90, 90)


def pdf_text(text: object) -> str:
    """``text`` as the page's font can print it: control characters become spaces,
    characters outside Windows-1252 their base letters (``Ł`` has none: ``?``)."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(" ")
        elif _printable(ch):
            out.append(ch)
        else:
            base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
            out.append(base if base and all(_printable(c) for c in base) else "?")
    return "".join(out)


def _printable(ch: str) -> bool:
    try:
        ch.encode(ENCODING)
    except UnicodeEncodeError:
        return False
    return True


def person_name(value: object) -> str:
    """``Family, Given Middle`` from a DICOM PN (its alphabetic group, else the first
    group that has one); the raw text when it is not a person name."""
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    for group in str(name).split("="):
        parts = [p.strip() for p in group.split("^")]
        if not any(parts):
            continue
        family, given = parts[0], " ".join(p for p in parts[1:3] if p)
        text = f"{family}, {given}" if family and given else family or given
        prefix_suffix = [p for p in parts[3:5] if p]
        return " ".join([*prefix_suffix[:1], text, *prefix_suffix[1:]])
    return ""


def _date(value: object) -> str:
    text = str(value or "").strip()
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


def patient_lines(header: Dataset) -> list[tuple[str, str]]:
    """(label, value) of the patient and study attributes the header has (a
    de-identified export may have none)."""
    found = [
        ("Patient name", person_name(header.get("PatientName") or "")),
        ("Patient ID", str(header.get("PatientID") or "")),
        ("Study date", _date(header.get("StudyDate"))),
        ("Accession number", str(header.get("AccessionNumber") or "")),
    ]
    return [(label, value.strip()) for label, value in found if str(value).strip()]


def _ml(value: float) -> str:
    return f"{value:.0f} ml" if abs(value) >= 10 else f"{value:.1f} ml"


def result_lines(volume: Volume, result: AnalysisResult) -> list[str]:
    """The finding and the volumes, one line each."""
    lines = [f"P(COVID-19-like) {result.probability:.2f} (decision threshold {result.threshold:.2f})"]
    probs = common.class_probabilities(result)
    if probs:
        lines.append("Class probabilities: " + "; ".join(f"{CASE_CLASS_TEXT[k]} {v:.2f}" for k, v in probs.items()))
    lines.append(f"Lung volume {_ml(result.lung_volume_ml)}")
    lines.append(f"Suspected infection {_ml(result.lesion_volume_ml)} ({result.involvement_percent:.1f}% of the lungs)")
    ggo, consolidation = common.opacity_volumes_ml(result, volume.voxel_volume_ml)
    if ggo is not None:
        lines.append(f"Ground-glass opacity {_ml(ggo)}")
    if consolidation is not None:
        lines.append(f"Consolidation {_ml(consolidation)}")
    return lines


def key_image(volume: Volume, result: AnalysisResult, style: HeatStyle = HeatStyle()) -> tuple[np.ndarray, str] | None:
    """The top key slice as the key-image series shows it (RGB), and a line naming it;
    None without key slices."""
    keys = list(dict.fromkeys(int(z) for z in result.key_slices))[:MAX_KEY_IMAGES]
    if not keys:
        return None
    z = keys[0]
    if not 0 <= z < volume.shape[0]:
        raise ValueError(f"result.key_slices holds z={z}, outside 0..{volume.shape[0] - 1}")
    counted = common.with_opacity_volumes(result, volume.voxel_volume_ml)
    caption = common.caption_for(counted, z, key=(1, len(keys)))
    lung = np.asarray(result.lung_labels[z]) > 0
    rgb = render_slice(volume.hu[z], result.heatmap[z], lung, caption, style)
    ref = volume.slices[z]
    where = f"image {ref.instance_number}" if ref.instance_number is not None else f"slice {z + 1}"
    if ref.frame_number is not None:
        where += f" frame {ref.frame_number}"
    return rgb, f"Key image 1/{len(keys)}: source {where}, AI slice score {float(result.slice_scores[z]):.2f}"


class _Page:
    """Cursor helpers over one fpdf2 page; every text goes through :func:`pdf_text`."""

    def __init__(self, when: datetime.datetime) -> None:
        pdf = FPDF(orientation="P", unit="mm", format="A4")
        pdf.core_fonts_encoding = ENCODING
        pdf.set_margins(_MARGIN, _MARGIN, _MARGIN)
        pdf.set_auto_page_break(False)  # one page: sections are sized to fit, never spill
        pdf.set_creation_date(when.astimezone(datetime.timezone.utc) if when.tzinfo else when)
        pdf.set_creator(f"{common.MANUFACTURER} {common.SOFTWARE_VERSION}")
        pdf.set_title(TITLE)  # no patient data in the document's metadata
        pdf.add_page()
        self.pdf = pdf

    def text(self, text: str, size: float = 10, style: str = "", colour=(0, 0, 0), width: float = 0,
             height: float | None = None, border: int = 0) -> None:
        pdf = self.pdf
        pdf.set_font("helvetica", style, size)
        pdf.set_text_color(*colour)
        pdf.multi_cell(width or _WIDTH - (pdf.get_x() - _MARGIN), height or size * 0.5, pdf_text(text),
                       border=border, padding=1.5 if border else 0, align="L", new_x="LMARGIN", new_y="NEXT")

    def heading(self, text: str) -> None:
        self.pdf.ln(2.5)
        self.text(text, 12, "B")
        self.pdf.ln(0.5)

    def pairs(self, pairs: Iterable[tuple[str, str]], label_width: float = 40) -> None:
        pdf = self.pdf
        for label, value in pairs:
            pdf.set_font("helvetica", "", 10)
            pdf.set_text_color(*_GREY)
            pdf.cell(label_width, 5, pdf_text(label))
            pdf.set_font("helvetica", "B", 10)
            pdf.set_text_color(0, 0, 0)
            pdf.multi_cell(_WIDTH - label_width, 5, pdf_text(value), align="L", new_x="LMARGIN", new_y="NEXT")


def build_pdf(volume: Volume, result: AnalysisResult, uids: common.ResultUids, *,
              when: datetime.datetime | None = None, style: HeatStyle = HeatStyle()) -> bytes:
    """The report page as PDF bytes; ``when`` is the analysis date/time printed (now)."""
    common.check_result_matches(volume, result)
    when = when or common.now()
    page = _Page(when)
    pdf = page.pdf
    warn = common.needs_disclaimer(result.algorithm)
    page.text(TITLE + (f" \u2014 {common.NOT_FOR_DIAGNOSTIC_USE}" if warn else ""), 16, "B",
              _RED if warn else (0, 0, 0), height=8)
    if warn:
        pdf.set_draw_color(*_RED)
        pdf.set_line_width(0.6)
        page.text(f"{common.NOT_FOR_DIAGNOSTIC_USE}. Research software: the result below is not a diagnosis "
                  f"and must not be used as one. The model was trained on {result.algorithm.trained_on} "
                  "and is not validated on patients.", 10, "B", _RED, height=5, border=1)
    revision = f" (revision {uids.revision}: replaces the earlier report of this series)" if uids.revision > 1 else ""
    page.text(f"Analysis {when:%Y-%m-%d %H:%M}{revision}", 9, colour=_GREY)

    page.heading("Patient and study")
    found = patient_lines(volume.datasets[0])
    if found:
        page.pairs(found)
    else:
        page.text("No patient or study identification in the source (de-identified series).", 10, "I", _GREY)

    page.heading("AI result")
    top = pdf.get_y()
    image = key_image(volume, result, style)
    text_width = _WIDTH - 70 if image is not None else _WIDTH
    page.text(common.case_class_text(result) or result.label, 13, "B", width=text_width, height=6.5)
    for line in result_lines(volume, result):
        page.text(line, 10, width=text_width, height=5.5)
    if result.comparison is not None:  # beside the key image, where the column has room
        _comparison(page, result.comparison, text_width)
    bottom = pdf.get_y()
    if image is not None:
        rgb, line = image
        side = 65.0
        pdf.image(Image.fromarray(rgb), x=_MARGIN + _WIDTH - side, y=top, w=side, h=side * rgb.shape[0] / rgb.shape[1])
        pdf.set_xy(_MARGIN + _WIDTH - side, top + side * rgb.shape[0] / rgb.shape[1] + 1)
        page.text(line, 8, colour=_GREY, width=side, height=4)
        bottom = max(bottom, pdf.get_y())
    pdf.set_xy(_MARGIN, bottom)

    if result.lobes:
        page.heading("Lobes")
        _lobe_table(page, result)
    if result.category is not None:
        page.heading("Category")
        category = result.category
        page.text(f"{SUGGESTION}: CO-RADS {category.co_rads}; RSNA: {category.rsna} (not a diagnosis)", 10, "B")
        for feature in category.features[:MAX_FEATURES]:
            page.text(f"- {feature}", 9, height=4.2)

    page.heading("Model")
    algo = result.algorithm
    versions = ", ".join(f"{k} {v}" for k, v in sorted(result.model_versions.items()))
    page.pairs([
        ("Model", f"{algo.name} {algo.version}"),
        ("Pipeline", common.method_label(result.pipeline)),
        *([("Model versions", versions)] if versions else []),
        ("Trained on", algo.trained_on),
        ("Clinically validated", "yes" if algo.clinically_validated else "no"),
        ("Analysed", f"{when:%Y-%m-%d %H:%M:%S}"),
        ("Software", f"{common.MANUFACTURER} {common.SOFTWARE_VERSION}"),
    ], label_width=40)
    return bytes(pdf.output())


def _comparison(page: _Page, comparison, width: float) -> None:
    """The change since the prior study: the verdict, the sentence, where the prior came from."""
    from ct_ai_node.pipeline.comparison import comparison_text

    page.pdf.ln(1.5)
    page.text(f"Compared with the prior study: {comparison.change.upper()}", 10.5, "B", width=width, height=5.5)
    page.text(comparison_text(comparison), 9, width=width, height=4.3)
    source = ("analysed by this node before" if comparison.source == "history"
              else "retrieved from the PACS and analysed for this comparison")
    page.text(f"Prior study {source}, with the same pipeline.", 8, colour=_GREY, width=width, height=4)


def _lobe_table(page: _Page, result: AnalysisResult) -> None:
    """Lobe, volume, involvement, severity; then the total CT severity score."""
    pdf = page.pdf
    widths = (60.0, 35.0, 40.0, 35.0)
    header = ("Lobe", "Volume (ml)", "Involvement (%)", "Severity (0-5)")
    rows = [(LOBE_TEXT.get(lobe.name, lobe.name), f"{lobe.volume_ml:.0f}", f"{lobe.involvement_percent:.1f}",
             str(int(lobe.severity))) for lobe in result.lobes]
    pdf.set_draw_color(160, 160, 160)
    pdf.set_line_width(0.2)
    for n, row in enumerate([header, *rows]):
        pdf.set_font("helvetica", "B" if n == 0 else "", 9.5)
        pdf.set_text_color(0, 0, 0)
        for i, (width, cell) in enumerate(zip(widths, row)):
            pdf.cell(width, 5, pdf_text(cell), border=1, align="L" if i == 0 else "R",
                     new_x="RIGHT" if i < len(row) - 1 else "LMARGIN", new_y="TOP" if i < len(row) - 1 else "NEXT")
    if result.ct_severity_score is not None:
        pdf.ln(1)
        page.text(f"CT severity score {int(result.ct_severity_score)} / 25", 10, "B")
