"""Initial weights for a new run (``--weights_path``): a Detectron2 model-zoo pickle or a
``save_pretrained`` folder. Mismatches are reported before training starts, never silently skipped."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..convert_detectron2 import load_detectron2_weights


def _load_pretrained_folder(model: torch.nn.Module, path: Path) -> str:
    weights_file = path / "model.safetensors" if path.is_dir() else path
    if not weights_file.is_file():
        raise FileNotFoundError(f"--weights_path {path}: no model.safetensors there")
    incoming = load_file(str(weights_file))
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs ours {tuple(own[k].shape)}"
        for k, v in incoming.items()
        if k in own and own[k].shape != v.shape
    ]
    predictor_only = all(".classifier." in m or m.startswith("decode_head.classifier") for m in mismatched)
    if mismatched and not predictor_only:
        raise ValueError(f"--weights_path {path} does not match the model: " + "; ".join(mismatched[:5]))
    for entry in mismatched:
        incoming.pop(entry.split()[0])
    result = model.load_state_dict(incoming, strict=False)
    missing = [k for k in result.missing_keys if k.split(".")[-1] != "num_batches_tracked"]
    unexpected = list(result.unexpected_keys)
    if unexpected or (missing and not all("classifier" in k for k in missing)):
        raise ValueError(
            f"--weights_path {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return f"loaded {len(incoming)} tensors from {weights_file}" + (
        f"; predictor left at its initialisation ({len(mismatched)} tensors of another shape)"
        if mismatched
        else ""
    )


def load_initial_weights(model: torch.nn.Module, weights_path: str | Path) -> str:
    """Load into ``model`` in place and return a one-paragraph report."""
    path = Path(weights_path)
    if not path.exists():
        raise FileNotFoundError(f"--weights_path {path}: no such file or folder")
    if path.suffix == ".pkl":
        return str(load_detectron2_weights(model, path))
    return _load_pretrained_folder(model, path)
