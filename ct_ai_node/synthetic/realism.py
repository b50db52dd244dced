"""Compare phantoms with real chest CT: lung HU histograms and side-by-side
lung-window PNGs.

    python -m ct_ai_node.synthetic.realism --real ../shared/data/real --out /tmp/realism

Real data are read from the given folder (never copied into the project);
the figures and ``report.txt`` go to ``--out``. The real lung mask is a classical
threshold-and-components mask, good enough for histograms.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .phantom import generate_phantom

BINS = np.arange(-1050, 151, 50)


def lung_window(hu: np.ndarray, level: float = -600, width: float = 1500) -> np.ndarray:
    return (np.clip((hu - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)


def real_lung_mask(hu: np.ndarray) -> np.ndarray:
    """Lungs of one real axial slice: air inside the body, two largest components."""
    body = ndi.binary_fill_holes(ndi.binary_opening(hu > -500, iterations=2))
    lab, n = ndi.label(body)
    if n > 1:
        sizes = ndi.sum(body, lab, range(1, n + 1))
        body = lab == (1 + int(np.argmax(sizes)))
    body = ndi.binary_fill_holes(body)
    lung = (hu < -300) & ndi.binary_erosion(body, iterations=3)
    lab, n = ndi.label(lung)
    if n == 0:
        return lung
    sizes = ndi.sum(lung, lab, range(1, n + 1))
    keep = [i + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] > 2000]
    return ndi.binary_fill_holes(ndi.binary_closing(np.isin(lab, keep), iterations=4))


def histogram(values: np.ndarray) -> np.ndarray:
    h, _ = np.histogram(values, BINS)
    return h / max(1, h.sum())


def histogram_table(real: np.ndarray, phantom: np.ndarray, names=("real", "phantom")) -> str:
    hr, hp = histogram(real), histogram(phantom)
    lines = [f"{'HU bin':>13} {names[0]:>8} {names[1]:>8}"]
    for i in range(len(BINS) - 1):
        lines.append(f"{BINS[i]:>6}..{BINS[i + 1]:<6} {hr[i]:8.3f} {hp[i]:8.3f}  {'#' * int(hr[i] * 100):<32}|{'#' * int(hp[i] * 100)}")
    for nm, v in zip(names, (real, phantom)):
        q = np.percentile(v, [5, 25, 50, 75, 95])
        lines.append(f"{nm:>8}: n={v.size} p5 {q[0]:.0f} p25 {q[1]:.0f} median {q[2]:.0f} p75 {q[3]:.0f} p95 {q[4]:.0f}")
    return "\n".join(lines)


def _read(path: Path):
    import pydicom

    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return ds, hu


def _series(folder: Path):
    items = [_read(p) for p in sorted(folder.glob("*.dcm"))]
    items.sort(key=lambda t: float(t[0].ImagePositionPatient[2]))
    return items[0][0], np.stack([t[1] for t in items])


def _side_by_side(a: np.ndarray, b: np.ndarray, out: Path, titles=("real", "phantom")):
    from PIL import Image, ImageDraw

    h = max(a.shape[0], b.shape[0])
    pad = lambda m: np.pad(m, ((0, h - m.shape[0]), (0, 0)))  # noqa: E731
    im = Image.fromarray(np.concatenate([pad(lung_window(a)), pad(lung_window(b))], 1))
    d = ImageDraw.Draw(im)
    d.text((5, 5), titles[0], fill=255)
    d.text((a.shape[1] + 5, 5), titles[1], fill=255)
    im.save(out)


def compare(real_dir: Path, out: Path, seeds=(12, 3)) -> str:
    """Write figures and return the text report."""
    out.mkdir(parents=True, exist_ok=True)
    report = []
    # 1) whole-chest series (Lung-PET-CT-Dx, 8 mm, B40f) vs a normal phantom with the same geometry
    series = sorted((real_dir / "lung_pet_ct_dx_sample").glob("Lung_Dx-*/*/*B40f*"))
    if series:
        ds, vol = _series(series[0])
        px = float(ds.PixelSpacing[0])
        dz = float(ds.SliceThickness)
        ph = generate_phantom(seeds[0], kind="normal", shape=(int(round(330 / dz)), 512, 512), spacing=(dz, px, px))
        rl = np.stack([real_lung_mask(s) for s in vol])
        rz = np.nonzero(rl.reshape(len(rl), -1).sum(1) > 3000)[0]
        pz = np.nonzero((ph.lung_labels > 0).reshape(ph.hu.shape[0], -1).sum(1) > 3000)[0]
        real_v, ph_v = [], []
        for rel in (0.2, 0.35, 0.5, 0.65, 0.8):
            zr = int(rz[0] + rel * (rz[-1] - rz[0]))
            zp = int(pz[0] + rel * (pz[-1] - pz[0]))
            real_v.append(vol[zr][rl[zr]])
            ph_v.append(ph.hu[zp][ph.lung_labels[zp] > 0].astype(np.float32))
            _side_by_side(vol[zr], ph.hu[zp].astype(np.float32), out / f"chest_{int(rel * 100):02d}.png",
                          (f"real Lung-PET-CT-Dx {ds.ConvolutionKernel} {dz:g} mm", f"phantom normal seed {seeds[0]} {ph.params['kernel']}"))
        report.append(f"== Lung-PET-CT-Dx {series[0].name} vs phantom normal seed {seeds[0]} (5 levels, lungs)")
        report.append(histogram_table(np.concatenate(real_v), np.concatenate(ph_v)))
    # 2) COVID-19-NY-SBU axial slices with ground glass vs covid phantom lesion voxels
    covid = sorted((real_dir / "covid19_ny_sbu_single_slices").glob("data-sample/*/axial/*.dcm"))
    picks = [p for p in covid if p.parent.parent.name in ("A002304", "A046441", "A056642")]
    if picks:
        real_v = []
        for i, p in enumerate(picks[:4]):
            ds, hu = _read(p)
            m = real_lung_mask(hu)
            if m.sum() > 5000:
                real_v.append(hu[m])
        ds, hu = _read(picks[0])
        px = float(ds.PixelSpacing[0])
        for seed in range(seeds[1] + 100, seeds[1] + 140):  # a moderate/severe case, like the real ones
            ph = generate_phantom(seed, kind="covid", shape=(int(330 / 2.5), 512, 512), spacing=(2.5, px, px))
            if ph.params["lesion_lung_ratio"] > 0.1:
                break
        les = ph.lesion_mask
        z = int(np.argmax(les.reshape(les.shape[0], -1).sum(1)))
        _side_by_side(hu, ph.hu[z].astype(np.float32), out / "covid_slice.png",
                      (f"real COVID-19-NY-SBU {picks[0].parent.parent.name} {ds.ConvolutionKernel}", f"phantom covid seed {ph.seed}"))
        report.append("== COVID-19-NY-SBU lungs (GGO cases) vs covid phantom lungs (slices with lesions)")
        zs = np.nonzero(les.reshape(les.shape[0], -1).any(1))[0]
        report.append(histogram_table(np.concatenate(real_v), ph.hu[zs][ph.lung_labels[zs] > 0].astype(np.float32)))
        report.append(f"phantom lesion voxels: median {np.median(ph.hu[les]):.0f} HU, "
                      f"lesion/lung {ph.params['lesion_lung_ratio']:.3f}")
    text = "\n".join(report)
    (out / "report.txt").write_text(text + "\n")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ct_ai_node.synthetic.realism")
    ap.add_argument("--real", default="../shared/data/real", help="folder with the real sample data")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    print(compare(Path(args.real), Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
