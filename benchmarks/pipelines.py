"""Benchmark: CPU seconds of every pipeline with weights on one 300-slice chest CT.

A 300 x 512 x 512 COVID-19-like phantom at 1 mm slices (0.7 mm pixels) is segmented once
by the lung U-Net; then each pipeline's method (classification + localisation, the part
that differs between pipelines) runs on it. Printed: seconds per pipeline and the ratio to
the default pipeline (method A) measured in the same run; the lung U-Net's time is shown
once (every pipeline needs it, the ensemble too); then the infection stage both ways (the
default method's heat map thresholded, as before issue 12, and the opacity U-Net with the
three-class case model, as now) and the default analysis's total with each, as a ratio.
Feeds the "CPU seconds per 300-slice scan" column of docs/models.md.

    python benchmarks/pipelines.py [--slices 300] [--device cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ct_ai_node.pipeline.methods import DEFAULT_PIPELINE, available_pipelines  # noqa: E402
from ct_ai_node.training.compare import seconds_per_scan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    names = [spec.name for spec in available_pipelines()]
    # the default first: it is the reference of the ratios
    names.sort(key=lambda n: n != DEFAULT_PIPELINE)
    secs = seconds_per_scan(names, torch.device(args.device), slices=args.slices, log=lambda m: None)
    ref = secs.get(DEFAULT_PIPELINE)
    print(f"{args.slices} x 512 x 512 phantom, {torch.get_num_threads()} threads on {args.device}")
    for name, s in secs.items():
        ratio = f"{s / ref:5.2f}x {DEFAULT_PIPELINE}" if ref and name in names else ""
        print(f"  {name:16s} {s:7.1f} s  {ratio}")
    lungs = secs.get("lungs (U-Net)", 0.0)
    if ref is not None and "heat-map mask" in secs and "opacity U-Net + case model" in secs:
        before = lungs + ref + secs["heat-map mask"]
        now = lungs + ref + secs["opacity U-Net + case model"]
        print(f"  default analysis, lungs + {DEFAULT_PIPELINE} + infection stage: heat-map mask {before:.1f} s, "
              f"opacity U-Net + case model {now:.1f} s ({now / before:.2f}x)")
    missing = [n for n in names if n not in secs]
    if missing:
        print(f"  (no weights: {', '.join(missing)})")
    if args.json:
        args.json.write_text(json.dumps({"slices": args.slices, "device": args.device, "seconds": secs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
