"""Loading and saving model weights as safetensors, with a hash check.

A weight file carries its own description in the safetensors metadata
(``architecture``, ``arch_kwargs`` as JSON, ``version``, plus free keys such as the
calibrated decision thresholds). The file's SHA-256 must match the manifest
(``manifest.json`` beside the weights) before a single tensor is used, so a truncated
or swapped file is refused with a clear reason. Sites bring their own weights the same
way: a folder with ``*.safetensors`` files and a ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ct_ai_node.errors import ModelError, WeightsMissing
from ct_ai_node.models.networks import build

logger = logging.getLogger(__name__)

BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    metadata: dict[str, str]
    sha256: str

    @property
    def version(self) -> str:
        return f"{self.metadata.get('version', '0')}+{self.sha256[:8]}"


def weights_folder(weights_dir: Path | str | None) -> Path:
    """The weights folder a caller names, or the bundled weights when it names none."""
    return Path(weights_dir) if weights_dir else BUNDLED_WEIGHTS


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelError(f"no {MANIFEST} in weights folder {folder}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg})") from exc
    return {name: entry["sha256"] if isinstance(entry, dict) else entry for name, entry in data.items()}


FP16_MAX = float(torch.finfo(torch.float16).max)


def fits_half(t: torch.Tensor) -> bool:
    """True when every value of ``t`` is finite and within fp16's range."""
    return t.numel() == 0 or bool(t.detach().float().abs().max() <= FP16_MAX)


def save_model(module: nn.Module, path: Path, *, architecture: str, arch_kwargs: dict, version: str,
               extra: dict[str, str] | None = None, half: bool = True) -> str:
    """Write ``module``'s state dict (fp16 for floating tensors when ``half``) and
    update the folder's manifest; returns the file's SHA-256.

    A tensor that fp16 cannot hold (any value beyond its range, e.g. the running
    variance of a late batch-norm layer in a network whose activations grow) stays
    fp32: an overflow to inf would silently turn that layer's output into a constant."""
    state = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point() and fits_half(v):
            v = v.half()
        state[k] = v
    meta = {"architecture": architecture, "arch_kwargs": json.dumps(arch_kwargs), "version": version}
    meta.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return _record_hash(path, {"version": version, "architecture": architecture})


def rewrite_metadata(path: Path, updates: dict[str, str]) -> str:
    """Write ``path`` again with ``updates`` merged into its safetensors metadata (the
    tensors byte for byte as they were) and update the manifest; returns the new SHA-256."""
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta.update(updates)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return _record_hash(path)


def install_weights(src: Path, folder: Path) -> str:
    """Copy a weights file trained elsewhere (e.g. on a borrowed GPU) into ``folder`` and
    enter it in that folder's manifest with the architecture and version its metadata
    names; returns its SHA-256. A file without them is refused (ModelError)."""
    src, folder = Path(src), Path(folder)
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
    missing = [k for k in ("architecture", "version") if k not in meta]
    if missing:
        raise ModelError(f"{src.name}: metadata lacks {', '.join(missing)}; not a ct-ai-node weights file")
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / src.name
    tmp = folder / f".{src.name}.tmp"
    shutil.copyfile(src, tmp)
    tmp.replace(dest)
    return _record_hash(dest, {"architecture": meta["architecture"], "version": meta["version"]})


def _record_hash(path: Path, entry: dict[str, str] | None = None) -> str:
    """Put ``path``'s SHA-256 into the manifest beside it: a new ``entry`` (with the
    hash) when given, else the hash of the existing entry replaced. Returns the hash."""
    digest = sha256_of(path)
    manifest_path = path.parent / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    old = manifest.get(path.name)
    if entry is not None:
        manifest[path.name] = {"sha256": digest, **entry}
    elif isinstance(old, dict):
        old["sha256"] = digest
    else:
        manifest[path.name] = digest
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return digest


def load_model(name: str, folder: Path | None = None, device: torch.device | str = "cpu") -> LoadedModel:
    """Load ``folder/name.safetensors`` after checking its SHA-256 against the manifest."""
    folder = weights_folder(folder)
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        raise WeightsMissing(f"weights {path.name} not found in {folder}; run `ct-ai-node train` or bring weights")
    expected = read_manifest(folder).get(path.name)
    if expected is None:
        raise ModelError(f"{path.name} is not listed in {folder / MANIFEST}")
    actual = sha256_of(path)
    if actual != expected:
        raise ModelError(f"{path.name}: SHA-256 {actual[:12]}... does not match the manifest ({expected[:12]}...)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ModelError(f"{path.name}: cannot read safetensors ({exc})") from exc
    try:
        module = build(metadata["architecture"], **json.loads(metadata.get("arch_kwargs", "{}")))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"{path.name}: metadata does not describe a known network ({exc})") from exc
    reference = module.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path.name}: tensors do not fit {metadata['architecture']} ({str(exc).splitlines()[0]})") from exc
    module.to(device).eval()
    logger.info("loaded %s (%s, sha256 %s)", path.name, metadata.get("architecture"), actual[:12])
    return LoadedModel(name=name, module=module, metadata=metadata, sha256=actual)
