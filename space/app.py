"""Sidewalk segmentation in the browser: upload an aerial image chip or a small GeoTIFF, see the sidewalks.

    SIDEWALK_MODEL=runs/<run>/best python space/app.py      # then open http://127.0.0.1:7860

The model is ``SIDEWALK_MODEL`` (a ``save_pretrained`` folder, a run folder or a Hub model id); without it,
the newest demo run's ``best/`` beside this folder (``make demo`` trains one), else the first ``models:``
entry of this Space's README.md (the published Space's model). Everything is the package's own code: a chip
goes through the model's image processor and the model in one pass; a GeoTIFF through large-area inference
(``sidewalk_hf.inference.predict_rasters``: band selection and scaling, blended sliding windows, nodata) and
the vector stage (``sidewalk_hf.network.vectorize_raster``: centerlines).

Errors in what a visitor uploads (not an image, the wrong band count, too large) are shown in the page as
messages, never as a stack trace.
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
MAX_GEOTIFF_SIDE_PX = 4096  # predicted window by window (minutes on a CPU at the largest)
MAX_UPLOAD_MB = 256  # a 4096 x 4096 4-band uint16 GeoTIFF, uncompressed, is 128 MiB
MAX_SHOWN_SIDE_PX = 2048  # larger GeoTIFFs are shown decimated (downloads keep every pixel)
KEEP_OUTPUTS_S = 3600
CHIP_SUFFIXES = (".png", ".jpg", ".jpeg")
GEOTIFF_SUFFIXES = (".tif", ".tiff")
NON_UINT8_SCALE = "percentiles:2,98"  # 16-bit or float GeoTIFFs without a rule of the model's own
OVERLAY_COLOUR = "#ff2828"
NODATA_COLOUR = "#7f7f7f"
CENTERLINE_COLOUR = (255, 212, 0)
OVERLAY_OPACITY = 0.55
# Small chips and maps fill their panels, drawn pixel by pixel rather than blurred.
CSS = (
    "#probability img, #centerlines img "
    "{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
)
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
    ``margin > logit(threshold)`` is ``probability > threshold`` without rounding (with two classes, at 0.5:
    the argmax, the pipeline's answer)."""
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


def request_folder() -> Path:
    """A new folder for one request's outputs; folders of requests over an hour old are removed (gradio
    has copied what it serves by then, and clears its own copies with ``delete_cache``)."""
    import shutil

    root = Path(tempfile.gettempdir()) / "sidewalk-space"
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        if time.time() - old.stat().st_mtime > KEEP_OUTPUTS_S:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))


def segment_chip(path: Path, threshold: float, progress: gr.Progress):
    progress(0.05, desc="Loading the model")
    loaded = current_model()
    rgb = read_chip(path, loaded.num_channels)
    progress(0.3, desc="Predicting")
    started = time.perf_counter()
    probability, margin = sidewalk_probability(loaded, rgb)
    seconds = time.perf_counter() - started
    mask = threshold_mask(margin, threshold)

    out_dir = request_folder()
    mask_path = out_dir / f"{path.stem}.mask.png"
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)
    overlay = (rgb, [(mask.astype(np.float32) * OVERLAY_OPACITY, "sidewalk")])
    status = (
        f"**{path.name}**: {rgb.shape[1]} x {rgb.shape[0]} px, sidewalk on {mask.mean():.1%} of the pixels "
        f"at threshold {threshold:.2f} ({seconds:.2f} s, model `{loaded.source}`). The mask PNG holds "
        "0 background, 1 sidewalk."
    )
    return overlay, probability_picture(probability), None, [str(mask_path)], status


def _named(error: Exception, path: Path) -> str:
    """An error message with the upload's temporary path replaced by the file's name."""
    return str(error).replace(str(path), f"`{path.name}`")


def geotiff_rule(loaded: LoadedModel, path: Path, bands_text: str):
    """The pixel rule for an uploaded GeoTIFF: the model's own rule when it has one and no bands are given,
    else the bands asked for (default: all) with uint8 passed through and other types stretched between
    their 2nd and 98th percentiles."""
    from sidewalk_hf.geo.raster import PixelRule, RasterInputError, open_raster, parse_bands

    try:
        bands = parse_bands(bands_text)
        with open_raster(path) as dataset:
            if max(dataset.width, dataset.height) > MAX_GEOTIFF_SIDE_PX:
                raise InputError(
                    f"`{path.name}` is {dataset.width} x {dataset.height} px; GeoTIFFs up to "
                    f"{MAX_GEOTIFF_SIDE_PX} x {MAX_GEOTIFF_SIDE_PX} px are predicted here "
                    "(use `scripts/predict.py` for larger areas)."
                )
            rule = PixelRule(bands=bands, scale="none")
            selected = rule.band_indexes(dataset)
            if len(selected) != loaded.num_channels:
                chosen = "" if bands is None else f", GeoTIFF bands selects {len(selected)}"
                example = ",".join(str(i + 1) for i in range(loaded.num_channels))
                raise InputError(
                    f"`{path.name}` has {dataset.count} band(s){chosen}; the model takes "
                    f"{loaded.num_channels}. Enter the {loaded.num_channels} bands to use under "
                    f"GeoTIFF bands (1-based, e.g. {example})."
                )
            dtype = dataset.dtypes[selected[0] - 1]
    except RasterInputError as error:
        raise InputError(_named(error, path).replace("--bands", "GeoTIFF bands")) from None
    if bands is None and getattr(loaded.processor, "pixel_rule", None):
        return PixelRule()  # inference applies the model's recorded rule
    return PixelRule(bands=bands, scale="none" if dtype == "uint8" else NON_UINT8_SCALE)


def write_threshold_mask(prob_path: Path, like_path: Path, threshold: float, out_path: Path) -> np.ndarray:
    """The mask at ``threshold``: the vector stage's cut of the probability GeoTIFF (probability >= the
    threshold; nodata stays 255), written with the georeference and tags of inference's mask."""
    import rasterio

    from sidewalk_hf.network.vectorize import read_sidewalk

    with rasterio.open(prob_path) as prob:
        sidewalk = read_sidewalk(prob, None, threshold, prob_path.name)
        nodata = prob.read(1) == 255
    mask = np.where(nodata, 255, sidewalk).astype(np.uint8)
    with rasterio.open(like_path) as like:
        profile, tags = like.profile, like.tags()
    profile.update(driver="GTiff", compress="deflate", tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(out_path, "w", **profile) as out:
        out.write(mask[None])
        out.update_tags(**tags, SIDEWALK_THRESHOLD=f"{threshold:g}")
    return mask


def centerline_pixels(geojson_path: Path, dataset) -> list[np.ndarray]:
    """The centerlines of the vector stage's GeoJSON (WGS84) as (N, 2) arrays of (col, row) in ``dataset``."""
    import json

    from pyproj import Transformer

    features = json.loads(geojson_path.read_text())["features"]
    to_raster = Transformer.from_crs("EPSG:4326", dataset.crs, always_xy=True)
    inverse = ~dataset.transform
    lines = []
    for feature in features:
        geometry = feature["geometry"]
        parts = [geometry["coordinates"]] if geometry["type"] == "LineString" else geometry["coordinates"]
        for part in parts:
            lon, lat = np.asarray(part, dtype=np.float64).T[:2]
            x, y = to_raster.transform(lon, lat)
            cols, rows = inverse * (np.asarray(x), np.asarray(y))
            lines.append(np.stack([cols, rows], axis=1))
    return lines


def segment_geotiff(path: Path, threshold: float, overlap: float, bands_text: str, progress: gr.Progress):
    import rasterio
    from PIL import ImageDraw

    from sidewalk_hf.geo.raster import PixelRule, read_window
    from sidewalk_hf.inference import InferenceOptions, predict_rasters
    from sidewalk_hf.network.vectorize import VectorInputError, vectorize_raster

    progress(0.02, desc="Loading the model")
    loaded = current_model()
    rule = geotiff_rule(loaded, path, bands_text)
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"The tile overlap must be in [0, 1), got {overlap}.")
    out_dir = request_folder()
    options = InferenceOptions(
        window_px=0,  # the model's training chip size
        stride_fraction=1.0 - overlap,
        write_probs=True,
        num_workers=0,  # no worker processes inside a web server
        rule=rule,
    )
    progress(0.05, desc="Predicting")
    started = time.perf_counter()
    manifest = predict_rasters(loaded.source, [str(path)], out_dir / "predictions", options)
    (entry,) = manifest["inputs"].values()
    if entry["status"] != "ok":
        raise InputError(_named(entry.get("error", "prediction failed"), path))
    predictions = out_dir / "predictions"
    prob_path = predictions / entry["outputs"]["prob"]["path"]
    mask_path = predictions / entry["outputs"]["mask"]["path"]
    if threshold != 0.5:  # at 0.5, inference's own mask (the most likely class) is the answer
        thresholded = out_dir / f"{path.stem}.mask.tif"
        write_threshold_mask(prob_path, mask_path, threshold, thresholded)
        mask_path = thresholded
    predict_seconds = time.perf_counter() - started

    network = None
    if entry["crs"]:  # the vector stage measures in metres: it needs a georeferenced raster
        progress(0.8, desc="Tracing centerlines")
        try:
            network = vectorize_raster(mask_path, out_dir / "vectors", tile_name=path.stem)
        except VectorInputError as error:
            raise InputError(_named(error, path)) from None
    seconds = time.perf_counter() - started

    progress(0.9, desc="Drawing")
    shown_rule = PixelRule.from_dict(manifest["pixel_rule"])
    with rasterio.open(path) as dataset:
        pixels, valid = read_window(dataset, None, shown_rule)
        lines = centerline_pixels(Path(network["centerlines"]), dataset) if network else []
    with rasterio.open(mask_path) as src:
        mask = src.read(1)
    with rasterio.open(prob_path) as src:
        prob = src.read(1)
    step = -(-max(mask.shape) // MAX_SHOWN_SIDE_PX)  # decimation for the page only
    rgb = np.ascontiguousarray(pixels[:3].transpose(1, 2, 0)[::step, ::step])
    if rgb.shape[2] < 3:
        rgb = np.repeat(rgb[..., :1], 3, axis=2)
    shown_mask, shown_prob, shown_valid = mask[::step, ::step], prob[::step, ::step], valid[::step, ::step]
    annotations = [((shown_mask == 1).astype(np.float32) * OVERLAY_OPACITY, "sidewalk")]
    if (shown_mask == 255).any():
        annotations.append(((shown_mask == 255).astype(np.float32) * 0.4, "nodata"))
    overlay = (rgb, annotations)
    probability = probability_picture(
        shown_prob.astype(np.float32) / 254.0, shown_valid & (shown_prob != 255)
    )
    centerlines = None
    if network:
        picture = Image.fromarray(rgb)
        draw = ImageDraw.Draw(picture)
        for line in lines:
            draw.line([tuple(point) for point in (line / step).tolist()], fill=CENTERLINE_COLOUR, width=2)
        centerlines = np.asarray(picture)

    downloads = [out_dir / f"{path.stem}.mask.tif", out_dir / f"{path.stem}.prob.tif"]
    if mask_path != downloads[0]:
        os.replace(mask_path, downloads[0])
    os.replace(prob_path, downloads[1])
    if network:
        downloads.insert(1, out_dir / f"{path.stem}.centerlines.geojson")
        os.replace(network["centerlines"], downloads[1])
    covered = (mask != 255).sum()
    shown = f", shown at 1/{step}" if step > 1 else ""
    status = (
        f"**{path.name}**: {mask.shape[1]} x {mask.shape[0]} px{shown}, {entry['crs'] or 'no CRS'}, "
        f"{manifest['parameters']['window_px']}-px windows with {overlap:.0%} overlap; sidewalk on "
        f"{(mask == 1).sum() / max(covered, 1):.1%} of the valid pixels at threshold {threshold:.2f}; "
    )
    if network:
        status += (
            f"{network['num_edges']} centerline segments, {network['length_m']:,.0f} m "
            f"({predict_seconds:.1f} s prediction, {seconds - predict_seconds:.1f} s centerlines; "
        )
    else:
        status += f"no centerlines: the GeoTIFF has no CRS ({predict_seconds:.1f} s prediction; "
    status += (
        f"model `{loaded.source}`). Downloads: the mask GeoTIFF (0 background, 1 sidewalk, 255 nodata), "
        + ("the centerlines GeoJSON (WGS84), " if network else "")
        + "the probability GeoTIFF (0-254 for 0-1, 255 nodata)."
    )
    return overlay, probability, centerlines, [str(p) for p in downloads], status


PROGRESS = gr.Progress(track_tqdm=True)  # gradio's progress bar, following the inference's window count


def segment(upload, threshold: float, overlap: float, bands: str = "", progress=PROGRESS):
    """The Run button: a chip or a GeoTIFF in, overlay, probability map, centerlines and downloads out."""
    try:
        if upload is None:
            raise InputError("Upload an image first (a PNG or JPEG chip, or a GeoTIFF).")
        path = Path(upload if isinstance(upload, str) else upload.name)
        if path.suffix.lower() in CHIP_SUFFIXES:
            return segment_chip(path, float(threshold), progress)
        if path.suffix.lower() in GEOTIFF_SUFFIXES:
            return segment_geotiff(path, float(threshold), float(overlap), bands or "", progress)
        raise InputError(
            f"`{path.name}`: upload a PNG or JPEG chip or a GeoTIFF "
            f"({', '.join(CHIP_SUFFIXES + GEOTIFF_SUFFIXES)})."
        )
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
    suffixes = CHIP_SUFFIXES + GEOTIFF_SUFFIXES
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in suffixes)
    with gr.Blocks(title="Sidewalk segmentation", delete_cache=(KEEP_OUTPUTS_S, KEEP_OUTPUTS_S)) as demo:
        gr.Markdown(
            "# Sidewalk segmentation\n"
            f"Upload an aerial image chip (PNG or JPEG, up to {MAX_CHIP_SIDE_PX} px a side) or a GeoTIFF "
            "(up to "
            f"{MAX_GEOTIFF_SIDE_PX} x {MAX_GEOTIFF_SIDE_PX} px, {MAX_UPLOAD_MB} MB). The model marks "
            "every pixel as sidewalk or background; for a GeoTIFF the sidewalks also become centerlines, "
            "and the mask and the centerlines can be downloaded as GeoTIFF and GeoJSON."
        )
        gr.Markdown(model_status(), elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Image (PNG or JPEG chip, or GeoTIFF)",
                    file_types=list(suffixes),
                    type="filepath",
                    elem_id="upload",
                )
                threshold = gr.Slider(
                    0.05, 0.95, value=0.5, step=0.05, label="Sidewalk probability threshold"
                )
                overlap = gr.Slider(
                    0.0, 0.5, value=0.25, step=0.05, label="Tile overlap (share of a tile, large images)"
                )
                bands = gr.Textbox(
                    value="",
                    label="GeoTIFF bands (1-based, in the model's order, e.g. 4,2,3; empty: all)",
                    elem_id="bands",
                )
                run = gr.Button("Find sidewalks", variant="primary", elem_id="run")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[upload], label="Examples")
            with gr.Column(scale=2):
                overlay = gr.AnnotatedImage(
                    label="Sidewalks",
                    color_map={"sidewalk": OVERLAY_COLOUR, "nodata": NODATA_COLOUR},
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
            inputs=[upload, threshold, overlap, bands],
            outputs=[overlay, probability, centerlines, downloads, status],
            api_name="segment",
        )
    return demo


demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    demo.queue(default_concurrency_limit=1)
    demo.launch(show_error=False, css=CSS, max_file_size=f"{MAX_UPLOAD_MB}mb")
