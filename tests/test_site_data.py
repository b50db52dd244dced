"""A site's own labelled scans (`train --data`, `evaluate --data`): labels.csv checks,
NIfTI and DICOM loading into the phantoms' axes, and training / evaluation on them."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ct_ai_node.cli import app
from ct_ai_node.errors import InputRejected
from ct_ai_node.synthetic import generate_phantom
from ct_ai_node.training.data import case_id, case_kind, check_fit_cases, describe_cases
from ct_ai_node.training.methods import fit_cases
from ct_ai_node.training.site_data import load_site_case, read_site_cases, split_cases

SAMPLE = Path(__file__).resolve().parents[1] / "sample_series"
SHAPE = (24, 96, 96)


def _save_nifti(path: Path, zyx: np.ndarray, spacing, lps_affine: bool = False) -> None:
    """(z, y, x) LPS-ordered array -> NIfTI, stored either RAS-ordered (the usual) or as
    is with an LPS affine (as some converters write); both must load back the same."""
    dz, dy, dx = spacing
    xyz = np.transpose(zyx, (2, 1, 0))
    if lps_affine:
        affine = np.diag([-dx, -dy, dz, 1.0])
    else:
        xyz = xyz[::-1, ::-1, :]
        affine = np.diag([dx, dy, dz, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(xyz), affine), str(path))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    rows = ["scan,label,lung_mask,lesion_mask,split"]
    phantoms = {}
    for i, (seed, kind) in enumerate([(7001, "covid"), (7002, "normal"), (7003, "cap"), (7004, "covid"),
                                      (7005, "normal")]):
        ph = generate_phantom(seed, kind=kind, shape=SHAPE)
        phantoms[f"s{i}.nii.gz"] = ph
        lps = i % 2 == 1
        _save_nifti(root / f"s{i}.nii.gz", ph.hu, ph.spacing, lps)
        lungs = ph.lung_labels if i != 2 else (ph.lung_labels > 0).astype(np.uint8)  # one label: split here
        _save_nifti(root / f"s{i}_lung.nii.gz", lungs, ph.spacing, lps)
        lesion = f"s{i}_lesion.nii.gz" if kind == "covid" and i == 0 else ""
        if lesion:
            _save_nifti(root / lesion, ph.lesion_mask.astype(np.uint8), ph.spacing, lps)
        split = "val" if i == 3 else ("test" if i == 4 else "train")
        rows.append(f"s{i}.nii.gz,{kind},s{i}_lung.nii.gz,{lesion},{split}")
    (root / "dicom_normal").symlink_to(SAMPLE / "normal")
    rows.append("dicom_normal,0,,,train")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, phantoms


def test_labels_csv_problems_are_one_line_naming_row_and_field(tmp_path):
    with pytest.raises(InputRejected, match="no labels.csv"):
        read_site_cases(tmp_path)
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    for text, match in [
        ("scan\na.nii.gz\n", "missing column"),
        ("scan,label\nb.nii.gz,covid\n", "row 2: scan 'b.nii.gz' not found"),
        ("scan,label\na.nii.gz,flu\n", "row 2: label 'flu'"),
        ("scan,label,lung_mask\na.nii.gz,covid,m.nii.gz\n", "row 2: lung_mask 'm.nii.gz' not found"),
        ("scan,label,split\na.nii.gz,covid,later\n", "row 2: split 'later'"),
    ]:
        (tmp_path / "labels.csv").write_text(text)
        with pytest.raises(InputRejected, match=match) as info:
            read_site_cases(tmp_path)
        assert "\n" not in str(info.value)
    (tmp_path / "labels.csv").write_text("scan,label\na.nii.gz,covid\n")
    with pytest.raises(InputRejected, match="not a readable NIfTI"):
        load_site_case(read_site_cases(tmp_path)[0])


def test_nifti_cases_load_in_the_phantom_axes(site):
    root, phantoms = site
    cases = read_site_cases(root)
    assert [c.kind for c in cases] == ["covid", "normal", "cap", "covid", "normal", "other"]
    assert [c.id for c in cases] == [-1, -2, -3, -4, -5, -6]
    for case in cases[:5]:
        ph = phantoms[Path(case.scan).name]
        scan = load_site_case(case)
        np.testing.assert_array_equal(scan.hu, ph.hu)  # RAS-stored and LPS-stored alike
        np.testing.assert_allclose(scan.spacing, ph.spacing, rtol=1e-5)
        assert scan.seed == case.id and scan.kind == case.kind
        if case.id == -3:  # one label for both lungs: split into right (1) and left (2)
            assert set(np.unique(scan.lung_labels)) == {0, 1, 2}
            right = ph.lung_labels == 1
            assert (scan.lung_labels[right] == 1).mean() > 0.95
        else:
            np.testing.assert_array_equal(scan.lung_labels, ph.lung_labels)
        assert scan.has_lesion_mask == (case.id == -1)
        if case.id == -1:
            np.testing.assert_array_equal(scan.lesion_mask, ph.lesion_mask)


def test_dicom_case_loads_with_classical_lungs(site):
    root, _ = site
    case = read_site_cases(root)[-1]
    scan = load_site_case(case)
    assert scan.hu.dtype == np.int16 and scan.hu.ndim == 3 and scan.hu.shape[0] == 56
    assert scan.lung_labels.max() == 2 and (scan.lung_labels > 0).mean() > 0.02
    assert not scan.lesion_mask.any() and not scan.has_lesion_mask


def test_split_and_case_references(site):
    root, _ = site
    rows = read_site_cases(root)
    train, val = fit_cases(0, 0, root)
    assert [c.id for c in train] == [-1, -2, -3, -6] and [c.id for c in val] == [-4]
    assert split_cases(rows, "test")[0].id == -5  # never used for fitting
    assert case_kind(train[0]) == "covid" and case_id(train[0]) == -1 and case_kind(1002) == "covid"
    assert describe_cases([1000, 1001, 1002, 1005] + train) == "1000..1002,1005,4 site scans"
    check_fit_cases(train, val)
    with pytest.raises(ValueError, match="overlap"):
        check_fit_cases(train, train[:1])
    with pytest.raises(ValueError, match="held-out"):
        check_fit_cases([90001], [])


def test_train_and_evaluate_on_site_scans(site, tmp_path):
    """Method D (volume labels only) trains one epoch on the site's scans, NIfTI and
    DICOM mixed, and the CLI evaluates the bundled default on the site's test rows."""
    from ct_ai_node.training.train_d import TrainDSettings, train_method_d

    root, _ = site
    train, val = fit_cases(0, 0, root)
    s = TrainDSettings(cache_dir=tmp_path / "cache", input_size=48, epochs=1, max_slices=12,
                       arch_kwargs={"width": 8, "lstm_hidden": 8, "attention_hidden": 8, "fc_hidden": 16})
    torch.manual_seed(0)
    model, metrics = train_method_d(train, val, s, "cpu", progress=False)
    assert metrics["train_volumes"] == 4 and metrics["val_volumes"] == 1
    assert np.isfinite(metrics["history"][0]["train_loss"])
    assert len(list((tmp_path / "cache").glob("d_-*.npz"))) == 5  # cached under the site ids

    res = CliRunner().invoke(app, ["evaluate", "--data", str(root), "--out", str(tmp_path / "ev"), "--device", "cpu",
                                   "--workers", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["cases"] == 1 and summary["seeds"] == "1 site scans"
    rows = json.loads((tmp_path / "ev" / "cases.json").read_text())
    assert rows[0]["kind"] == "normal" and rows[0]["lung_dice"] > 0.8
    # a normal scan: every lung slice is a negative, so no slice-level AUC can be formed
    assert set(rows[0]["slice_labels"]) == {0} and summary["slice_auc"] is None

    bad = CliRunner().invoke(app, ["train", "resnext-lstm", "--data", str(tmp_path), "--out", str(tmp_path / "w")])
    assert bad.exit_code == 2 and "no labels.csv" in bad.output
