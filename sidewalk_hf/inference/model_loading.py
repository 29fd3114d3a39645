"""The model, its normalisation and its window size, loaded once for inference."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class InferenceModel:
    """A model ready to run on uint8 windows: normalisation on the device, logits out."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    scale: torch.Tensor  # (1, C, 1, 1): rescale_factor / std
    offset: torch.Tensor  # (1, C, 1, 1): -mean / std
    num_channels: int
    num_labels: int
    sidewalk_label: int
    training_chip_px: int | None
    pixel_rule: dict | None
    source: str
    revision: str | None

    @torch.inference_mode()
    def logits(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) uint8 -> (B, num_labels, h, w) float32 logits on the CPU."""
        x = pixels_uint8.to(self.device, non_blocking=True).float()
        x = (x * self.scale + self.offset).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            out = self.model(pixel_values=x.to(self.dtype) if self.dtype != torch.float32 else x).logits
        return out.float().cpu()


def _training_chip_px(model_path: str, config) -> int | None:
    """The chip size the model was trained on: its config, else the run folder's config.yaml."""
    size = getattr(config, "training_chip_size_px", None)
    if size:
        return int(size)
    run_config = Path(model_path).parent / "config.yaml"
    if run_config.is_file():
        try:
            return int(yaml.safe_load(run_config.read_text())["INPUT"]["CROP_SIZE_PX"])
        except (KeyError, TypeError, ValueError, yaml.YAMLError):
            return None
    return None


def load_inference_model(
    model: str | Path, *, device: str | torch.device | None = None, dtype: str = "fp32", optimize: bool = True
) -> InferenceModel:
    """Load a ``save_pretrained`` folder, a run folder (its ``best/``) or a Hub id for inference.

    ``optimize`` folds the batch norms into the convolutions (same class maps, less work); ``dtype`` bf16
    runs under bf16 autocast where the device supports it.
    """
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    from ..evaluation import resolve_model_path

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(model)
    network = AutoModelForSemanticSegmentation.from_pretrained(path, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network = network.to(device).eval()
    if optimize and hasattr(network, "optimize_for_inference"):
        network = network.optimize_for_inference(channels_last=True)
    else:
        network = network.to(memory_format=torch.channels_last)
    config = network.config
    num_channels = int(getattr(config, "num_channels", len(processor.image_mean)))
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
    label2id = {str(k).lower(): int(v) for k, v in (config.label2id or {}).items()}
    return InferenceModel(
        model=network,
        device=device,
        dtype=DTYPES[dtype],
        scale=(float(processor.rescale_factor) / std).to(device),
        offset=(-mean / std).to(device),
        num_channels=num_channels,
        num_labels=int(config.num_labels),
        sidewalk_label=label2id.get("sidewalk", int(config.num_labels) - 1),
        training_chip_px=_training_chip_px(path, config),
        pixel_rule=getattr(processor, "pixel_rule", None),
        source=str(model),
        revision=getattr(config, "_commit_hash", None),
    )
