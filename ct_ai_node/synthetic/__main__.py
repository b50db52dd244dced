"""``python -m ct_ai_node.synthetic --out DIR --seed N --kind covid|cap|normal``

Writes OUT/dicom/CT*.dcm (one CT Image Storage file per slice) and the ground
truth beside it: OUT/truth.npz (lung_labels, lesion_mask, spacing) and
OUT/truth.json (kind, drawn parameters, UIDs).
"""

from __future__ import annotations

import argparse
import sys
import time

from pathlib import Path

from .dicom_series import write_case, write_dicom_series, write_truth
from .phantom import KINDS, generate_phantom


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ct_ai_node.synthetic", description=__doc__.split("\n\n")[0].strip("`"))
    ap.add_argument("--out", help="output folder (dicom/ and truth.* go inside)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=KINDS, default=None, help="default: drawn from the seed")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, metavar=("DZ", "DY", "DX"), help="mm")
    ap.add_argument("--feet-first", action="store_true", help="FFS: InstanceNumber 1 = most inferior slice")
    ap.add_argument("--patient-id", default=None)
    ap.add_argument("--patient-name", default=None)
    ap.add_argument("--series-number", type=int, default=1)
    ap.add_argument("--study-date", default=None, help="YYYYMMDD")
    ap.add_argument("--dicom-dir", default=None, help="write the DICOM files here instead of OUT/dicom")
    ap.add_argument("--truth-dir", default=None, help="write truth.npz/json here instead of OUT")
    args = ap.parse_args(argv)
    if not args.out and not (args.dicom_dir and args.truth_dir):
        ap.error("--out is required unless both --dicom-dir and --truth-dir are given")
    t0 = time.perf_counter()
    ph = generate_phantom(args.seed, kind=args.kind, shape=tuple(args.shape) if args.shape else None,
                          spacing=tuple(args.spacing) if args.spacing else None)
    kw = dict(feet_first=args.feet_first, series_number=args.series_number, study_date=args.study_date)
    kw["patient_id"] = args.patient_id or f"PHANTOM-{args.seed:04d}"
    kw["patient_name"] = args.patient_name or f"Phantom^{ph.kind.capitalize()}"
    if args.dicom_dir or args.truth_dir:
        files = write_dicom_series(ph, args.dicom_dir or Path(args.out) / "dicom", **kw)
        write_truth(ph, args.truth_dir or args.out, files)
        res = {"dicom": files}
    else:
        res = write_case(ph, args.out, **kw)
    # no patient name in the output: it belongs in the headers only
    print(f"{ph.kind} phantom seed={args.seed} shape={ph.hu.shape} spacing={tuple(round(s, 3) for s in ph.spacing)} "
          f"lesion/lung={ph.params['lesion_lung_ratio']:.4f}: {len(res['dicom'])} slices -> {args.dicom_dir or args.out} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
