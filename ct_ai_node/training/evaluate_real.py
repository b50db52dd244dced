"""``ct-ai-node evaluate --real DIR``: every real chest CT series under DIR through the
pipeline, one row each (probability, class, opacity volumes), for the model card's
real-data section.

DICOM series are loaded as ``analyze`` loads them (the node's series selection, slices up
to 10 mm accepted: routine chest series of 8 mm are real scans too); NIfTI files as the
training loader does. Each row says whether the series was a training background (its
lesion insertions and the scan itself as a negative were fitted on) or held out, and
the truth when the data's README states it (``TRUTH``; None otherwise). Series whose
lungs are too small for a chest CT are listed with the reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ct_ai_node.errors import CtAiNodeError
from ct_ai_node.pipeline.methods import create_method
from ct_ai_node.pipeline.run import analyse_volume, create_lung_segmenter
from ct_ai_node.training.real_backgrounds import Background, discover_backgrounds, is_held_out, thick_series_policy

#: what the shared data's READMEs say about each collection (first folder of the name)
TRUTH = {
    "lidc_idri_0001": "no pneumonia (lung nodules)",
    "lung_pet_ct_dx_sample": "no pneumonia (lung adenocarcinoma)",
}


def _volume(bg: Background):
    from ct_ai_node.training.evaluate import phantom_volume
    from ct_ai_node.training.site_data import SiteScan, _nifti_zyx
    from ct_ai_node.volume import load_series_from_folder

    if Path(bg.path).is_dir():
        vol, _sel, _rep = load_series_from_folder(bg.path, thick_series_policy())
        return vol
    hu, spacing = _nifti_zyx(bg.path)
    scan = SiteScan(hu=hu.astype(np.float32), lung_labels=np.zeros(hu.shape, np.uint8),
                    lesion_mask=np.zeros(hu.shape, bool), spacing=spacing, kind="other", seed=0, has_lesion_mask=False)
    return phantom_volume(scan)


def evaluate_real(root: Path, out_dir: Path, device: torch.device, pipeline: str = "radlogics",
                  weights_dir: Path | None = None, held_out: tuple[str, ...] = (), log=print) -> list[dict]:
    from ct_ai_node.pipeline.model_cache import create_infection_source

    method = create_method(pipeline, device, weights_dir)
    lungs = create_lung_segmenter("unet", device, weights_dir)
    infection = create_infection_source("unet", device, weights_dir)
    rows = []
    for bg in discover_backgrounds(Path(root)):
        row: dict = {"series": bg.name, "truth": TRUTH.get(bg.name.split("/")[0]),
                     "role": "held out" if is_held_out(bg, held_out) else "training background"}
        t = time.perf_counter()
        try:
            res = analyse_volume(_volume(bg), method, lungs, None, pipeline, infection)
        except CtAiNodeError as exc:
            row["not_analysed"] = " ".join(str(exc).split())
            row["role"] = "not used (not analysable)" if row["role"] != "held out" else row["role"]
            rows.append(row)
            log(f"{bg.name}: not analysed ({row['not_analysed']})")
            continue
        row.update({
            "probability": round(res.probability, 4), "case_class": res.case_class,
            "class_probabilities": {k: round(v, 4) for k, v in res.class_probabilities.items()},
            "method_probability": None if res.method_probability is None else round(res.method_probability, 4),
            "label": res.label, "lung_ml": round(res.lung_volume_ml, 1), "opacity_ml": round(res.lesion_volume_ml, 2),
            "ggo_ml": None if res.ggo_volume_ml is None else round(res.ggo_volume_ml, 2),
            "consolidation_ml": None if res.consolidation_volume_ml is None else round(res.consolidation_volume_ml, 2),
            "seconds": round(time.perf_counter() - t, 1),
        })
        rows.append(row)
        log(f"{bg.name}: {res.case_class} p={res.probability:.3f} (method {row['method_probability']}), "
            f"opacity {res.lesion_volume_ml:.1f} ml")
    slices = single_slice_rows(Path(root), method, lungs, infection, log)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "real_series.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out_dir / "real_single_slices.json").write_text(json.dumps(slices, indent=1) + "\n")
    return rows


#: single axial slices (first folder of the path -> truth): real COVID-19 patients (some
#: slices show ground glass or consolidation, about half are abdomen), and LIDC slices
SINGLE_SLICES = {"covid19_ny_sbu_single_slices": "COVID-19 patient", "lungmask_testdata": "no COVID-19 (LIDC)"}
#: a single slice with less lung than this (cm²) is not scored
MIN_SLICE_LUNG_CM2 = 20.0


def single_slice_rows(root: Path, method, lungs, infection, log=print) -> list[dict]:
    """Each axial single slice of :data:`SINGLE_SLICES` through the lung U-Net, the opacity
    U-Net (a one-plane scan) and the method: the slice's opacity score, its opacity and
    lung area and the method's slice score."""
    from ct_ai_node.pipeline.pattern import slice_opacity_scores
    from ct_ai_node.pipeline.run import segment_opacities
    from ct_ai_node.volume import load_volume

    rows = []
    for folder, truth in SINGLE_SLICES.items():
        for f in sorted((root / folder).rglob("*.dcm")):
            if "coronal" in f.parts or "sagittal" in f.parts:
                continue
            vol = load_volume([f])  # as the node reads it: HU, padding to air, geometry
            _dz, dy, dx = vol.spacing
            labels = lungs(vol.hu, vol.spacing, vol.orientation)
            lung = labels > 0
            lung_cm2 = float(lung.sum()) * dy * dx / 100.0
            row = {"file": str(f.relative_to(root)), "truth": truth, "lung_cm2": round(lung_cm2, 1)}
            if lung_cm2 >= MIN_SLICE_LUNG_CM2:
                mask = segment_opacities(infection, vol.hu, vol.spacing, vol.orientation, labels).mask
                row.update({"opacity_cm2": round(float(mask.sum()) * dy * dx / 100.0, 2),
                            "opacity_score": round(float(slice_opacity_scores(mask, lung, vol.spacing)[0]), 4),
                            "method_score": round(float(method(vol.hu, vol.spacing, vol.orientation,
                                                               labels).slice_scores[0]), 4)})
            rows.append(row)
            log(f"{row['file']}: {row}")
    return rows
