"""Sidewalk segmentation in the browser: upload an aerial image chip, see the sidewalks the model finds.

    SIDEWALK_MODEL=runs/<run>/best python space/app.py      # then open http://127.0.0.1:7860

The model is ``SIDEWALK_MODEL`` (a ``save_pretrained`` folder, a run folder or a Hub model id); without it,
the newest demo run's ``best/`` beside this folder (``make demo`` trains one), else the first ``models:``
entry of this Space's README.md (the published Space's model). Prediction is the package's own: the model's
image processor, the model, the class probabilities; nothing here re-implements them.

Errors in what a visitor uploads (a file that is no image, the wrong band count, too large) are shown in the
page as messages, never as a stack trace.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sidewalk_hf import SidewalkDeepLabForSemanticSegmentation, SidewalkImageProcessor
from sidewalk_hf.evaluation import resolve_model_path
from sidewalk_hf.space import space_card_metadata

logger = logging.getLogger("sidewalk_space")

APP_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = APP_DIR / "examples"
MAX_CHIP_SIDE_PX = 2048  # a chip is predicted in one forward pass; larger images belong in a GeoTIFF
CHIP_SUFFIXES = (".png", ".jpg", ".jpeg")
OVERLAY_COLOUR = "#ff2828"
OVERLAY_OPACITY = 0.55
# Small chips and maps fill their panels, drawn pixel by pixel rather than blurred.
CSS = "#probability img, #centerlines img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
NO_MODEL_MESSAGE = (
    "**No model is loaded.** Start the app with `SIDEWALK_MODEL` set to a model: a `save_pretrained` folder "
    "(`SIDEWALK_MODEL=runs/<run>/best python space/app.py`) or a Hub model id. `make demo` trains one on "
    "generated data in about ten minutes on a CPU."
)


class InputError(ValueError):
    """Something wrong with what the visitor gave; the message is shown in the page as it is."""


@dataclass
class LoadedModel:
    source: str
    model: SidewalkDeepLabForSemanticSegmentation
    processor: SidewalkImageProcessor

    @property
    def sidewalk_id(self) -> int:
        label2id = self.model.config.label2id
        return int(label2id.get("sidewalk", max(self.model.config.id2label)))

    @property
    def num_channels(self) -> int:
        return int(self.model.config.num_channels)


def model_source() -> str | None:
    """``SIDEWALK_MODEL``, else the newest demo run's best model, else the Space card's model."""
    if os.environ.get("SIDEWALK_MODEL"):
        return os.environ["SIDEWALK_MODEL"]
    demo_runs = sorted((APP_DIR.parent / "runs").glob("*-demo/best/model.safetensors"))
    if demo_runs:
        return str(demo_runs[-1].parent)
    try:
        models = space_card_metadata((APP_DIR / "README.md").read_text()).get("models") or []
    except (OSError, ValueError, TypeError):
        models = []
    return str(models[0]) if models else None


@lru_cache(maxsize=1)
def load_model(source: str) -> LoadedModel:
    """The model and its image processor, with this package's classes (no remote code is run)."""
    path = resolve_model_path(source)
    model = SidewalkDeepLabForSemanticSegmentation.from_pretrained(path).eval()
    processor = SidewalkImageProcessor.from_pretrained(path)
    return LoadedModel(source=path, model=model, processor=processor)


def current_model() -> LoadedModel:
    source = model_source()
    if source is None:
        raise InputError(NO_MODEL_MESSAGE)
    try:
        return load_model(source)
    except (OSError, ValueError) as error:
        raise InputError(f"The model `{source}` could not be loaded: {error}") from None


def sidewalk_probability(loaded: LoadedModel, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(probability, margin)`` of sidewalk per pixel of an (H, W, C) uint8 chip, through the model's image
    processor and the model. ``margin`` is the sidewalk logit minus the log-sum-exp of the others, so
    ``margin > logit(threshold)`` is ``probability > threshold`` without rounding (at 0.5: the argmax)."""
    inputs = loaded.processor(images=rgb, return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**inputs).logits[0].float()
    sidewalk = loaded.sidewalk_id
    others = torch.cat([logits[:sidewalk], logits[sidewalk + 1 :]])
    margin = logits[sidewalk] - torch.logsumexp(others, dim=0)
    return torch.sigmoid(margin).numpy(), margin.numpy()


def threshold_mask(margin: np.ndarray, threshold: float) -> np.ndarray:
    """Sidewalk where the probability exceeds ``threshold`` (0 < threshold < 1)."""
    if not 0.0 < threshold < 1.0:
        raise InputError(f"The threshold must be between 0 and 1 (exclusive), got {threshold}.")
    return margin > np.log(threshold / (1.0 - threshold))


def probability_picture(probability: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 picture of a probability map (matplotlib's magma colours; invalid pixels grey)."""
    from matplotlib import colormaps

    picture = (colormaps["magma"](probability)[..., :3] * 255).round().astype(np.uint8)
    if valid is not None:
        picture[~valid] = 128
    return picture


def read_chip(path: Path, num_channels: int) -> np.ndarray:
    """An uploaded PNG/JPEG chip as (H, W, 3) uint8 RGB, or an ``InputError`` saying what is wrong."""
    if num_channels != 3:
        raise InputError(
            f"This model takes {num_channels}-band images; PNG and JPEG chips have 3 (RGB). "
            "Upload a GeoTIFF with the model's bands."
        )
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max(width, height) > MAX_CHIP_SIDE_PX:
                raise InputError(
                    f"`{path.name}` is {width} x {height} px; chips up to {MAX_CHIP_SIDE_PX} px a side are "
                    "predicted here. Upload a larger area as a GeoTIFF."
                )
            if image.mode in ("P", "PA"):  # a palette image is colour
                image = image.convert("RGBA")
            if len(image.getbands()) < 3:
                raise InputError(
                    f"`{path.name}` has {len(image.getbands())} band(s) ({image.mode}); the model takes "
                    "3-band RGB chips."
                )
            return np.array(image.convert("RGB"))  # an alpha band is dropped
    except UnidentifiedImageError:
        raise InputError(f"`{path.name}` is not a readable PNG or JPEG image.") from None
    except (OSError, Image.DecompressionBombError) as error:  # truncated, corrupt or huge image data
        raise InputError(f"`{path.name}` could not be decoded: {error}") from None


def segment_chip(path: Path, threshold: float, progress: gr.Progress):
    progress(0.05, desc="Loading the model")
    loaded = current_model()
    rgb = read_chip(path, loaded.num_channels)
    progress(0.3, desc="Predicting")
    started = time.perf_counter()
    probability, margin = sidewalk_probability(loaded, rgb)
    seconds = time.perf_counter() - started
    mask = threshold_mask(margin, threshold)

    out_dir = Path(tempfile.mkdtemp(prefix="sidewalk-"))
    mask_path = out_dir / f"{path.stem}.mask.png"
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)
    overlay = (rgb, [(mask.astype(np.float32) * OVERLAY_OPACITY, "sidewalk")])
    status = (
        f"**{path.name}**: {rgb.shape[1]} x {rgb.shape[0]} px, sidewalk on {mask.mean():.1%} of the pixels "
        f"at threshold {threshold:.2f} ({seconds:.2f} s, model `{loaded.source}`). The mask PNG holds "
        "0 background, 1 sidewalk."
    )
    return overlay, probability_picture(probability), None, [str(mask_path)], status


def segment(upload, threshold: float, overlap: float, progress=gr.Progress()):  # noqa: B008 (gradio's idiom)
    """The Run button: a chip or a GeoTIFF in, overlay, probability map, centerlines and downloads out."""
    try:
        if upload is None:
            raise InputError("Upload an image first (a PNG or JPEG chip, or a GeoTIFF).")
        path = Path(upload if isinstance(upload, str) else upload.name)
        if path.suffix.lower() in CHIP_SUFFIXES:
            return segment_chip(path, float(threshold), progress)
        raise InputError(f"`{path.name}`: upload a PNG or JPEG chip ({', '.join(CHIP_SUFFIXES)}).")
    except InputError as error:
        raise gr.Error(str(error), print_exception=False) from None
    except Exception as error:  # a bug, not the visitor's fault: logged here, a message in the page
        logger.exception("segmentation failed")
        raise gr.Error(
            f"Segmentation failed ({type(error).__name__}): {error}", print_exception=False
        ) from None


def model_status() -> str:
    source = model_source()
    if source is None:
        return NO_MODEL_MESSAGE
    return f"Model: `{source}`"


def build_demo() -> gr.Blocks:
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in CHIP_SUFFIXES)
    with gr.Blocks(title="Sidewalk segmentation") as demo:
        gr.Markdown(
            "# Sidewalk segmentation\n"
            "Upload an aerial image chip (PNG or JPEG, up to "
            f"{MAX_CHIP_SIDE_PX} px a side). The model marks every pixel as sidewalk or background."
        )
        gr.Markdown(model_status(), elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Image (PNG or JPEG chip)",
                    file_types=list(CHIP_SUFFIXES),
                    type="filepath",
                    elem_id="upload",
                )
                threshold = gr.Slider(
                    0.05, 0.95, value=0.5, step=0.05, label="Sidewalk probability threshold"
                )
                overlap = gr.Slider(
                    0.0, 0.5, value=0.25, step=0.05, label="Tile overlap (share of a tile, large images)"
                )
                run = gr.Button("Find sidewalks", variant="primary", elem_id="run")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[upload], label="Examples")
            with gr.Column(scale=2):
                overlay = gr.AnnotatedImage(
                    label="Sidewalks",
                    color_map={"sidewalk": OVERLAY_COLOUR},
                    format="png",
                    height=480,
                    elem_id="overlay",
                )
                with gr.Row():
                    probability = gr.Image(
                        label="Sidewalk probability", format="png", height=300, elem_id="probability"
                    )
                    centerlines = gr.Image(
                        label="Centerlines (GeoTIFF)", format="png", height=300, elem_id="centerlines"
                    )
                downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")
                status = gr.Markdown(elem_id="status")
        run.click(
            segment,
            inputs=[upload, threshold, overlap],
            outputs=[overlay, probability, centerlines, downloads, status],
            api_name="segment",
        )
    return demo


demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    demo.queue(default_concurrency_limit=1).launch(show_error=False, css=CSS)
