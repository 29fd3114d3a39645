"""The whole product on one synthetic scene: GeoTIFF in, sidewalk masks and a scored sidewalk network out.

``make demo`` ends here after training: a georeferenced scene is rendered at the model's training scale,
predicted with ``predict_rasters``, vectorised with ``vectorize_run``, and the network is scored against the
scene's true centerlines; an overview picture shows the image, the predicted sidewalks and both networks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data.scene import REFERENCE_GSD_M, write_scene
from .inference import InferenceOptions, load_inference_model, predict_rasters


def _pixel_lines(geojson_path: Path, dataset) -> list[np.ndarray]:
    """Line coordinates of a GeoJSON file (WGS84, or the scene CRS when it names one) in raster pixels."""
    from pyproj import Transformer

    collection = json.loads(geojson_path.read_text())
    named = (collection.get("crs") or {}).get("properties", {}).get("name")
    to_raster = Transformer.from_crs(named or "EPSG:4326", dataset.crs, always_xy=True)
    inverse = ~dataset.transform
    lines = []
    for feature in collection["features"]:
        geometry = feature["geometry"]
        parts = (
            geometry["coordinates"] if geometry["type"] == "MultiLineString" else [geometry["coordinates"]]
        )
        for part in parts:
            xy = np.array(part, dtype=np.float64)
            x, y = to_raster.transform(xy[:, 0], xy[:, 1])
            cols, rows = inverse * (np.asarray(x), np.asarray(y))
            lines.append(np.stack([cols, rows], axis=1))
    return lines


def overview_picture(
    image_path: Path,
    mask_path: Path,
    predicted: Path,
    truth: Path,
    out: Path,
    max_px: int = 1400,
    detail_px: int = 0,
) -> Path:
    """Image with predicted sidewalks (magenta), predicted centerlines (red) and true ones (cyan, thin).

    ``detail_px`` > 0 draws the top-left ``detail_px`` square at full resolution instead of the whole scene.
    """
    import rasterio
    from PIL import Image, ImageDraw
    from rasterio.windows import Window

    with rasterio.open(image_path) as src, rasterio.open(mask_path) as mask_src:
        if detail_px:
            window, factor = Window(0, 0, min(detail_px, src.width), min(detail_px, src.height)), 1
            shape = (window.height, window.width)
        else:
            window, factor = None, max(1, int(np.ceil(max(src.width, src.height) / max_px)))
            shape = (src.height // factor, src.width // factor)
        rgb = src.read([1, 2, 3], window=window, out_shape=(3, *shape)).transpose(1, 2, 0).astype(np.float32)
        mask = mask_src.read(1, window=window, out_shape=shape)
        predicted_lines, true_lines = _pixel_lines(predicted, src), _pixel_lines(truth, src)
    sidewalk = mask == 1
    rgb[sidewalk] = 0.55 * rgb[sidewalk] + 0.45 * np.array([255, 0, 255])
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    zoom = 2 if detail_px else 1  # a detail is drawn at twice its resolution, so that thin lines stay apart
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    for lines, colour, width in ((predicted_lines, (255, 40, 40), 3), (true_lines, (0, 230, 255), 1)):
        for line in lines:
            draw.line([tuple(p) for p in (line * zoom / factor).tolist()], fill=colour, width=width)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    return out


def run_scene_demo(
    model: str,
    out_dir: str | Path,
    *,
    height_px: int = 2048,
    width_px: int = 2048,
    seed: int = 11,
    cfg=None,
    device: str | None = None,
) -> dict:
    """Render, predict, vectorise and score one scene; returns (and writes as ``scene_demo.json``) the figures."""
    from .network.scoring import cldice_rasters, score_files
    from .network.vectorize import vectorize_run

    out_dir = Path(out_dir)
    loaded = load_inference_model(model, device=device)
    chip_px = loaded.training_chip_px or 256
    scene = write_scene(
        out_dir / "scene",
        "demo_scene",
        height_px=height_px,
        width_px=width_px,
        seed=seed,
        gsd_m=REFERENCE_GSD_M * 256 / chip_px,
    )
    predicted = out_dir / "predicted"
    options = InferenceOptions(window_px=chip_px, write_probs=True, num_workers=1)
    manifest = predict_rasters(model, [str(scene.image)], predicted, options, overwrite=True, device=device)
    entry = next(iter(manifest["inputs"].values()))
    if entry["status"] != "ok":
        raise RuntimeError(f"prediction of the demo scene failed: {entry.get('error')}")
    mask = predicted / entry["outputs"]["mask"]["path"]
    vectors = vectorize_run([mask], predicted, cfg)
    centerlines = Path(vectors["tiles"][0]["centerlines"])
    vector_cfg = getattr(cfg, "VECTOR", None)
    buffers = tuple(vector_cfg.SCORE_BUFFERS_M) if vector_cfg is not None else (1.0, 2.0)
    scores = score_files(centerlines, scene.centerlines, buffers_m=buffers) | cldice_rasters(
        mask, scene.truth_mask
    )
    picture = overview_picture(
        scene.image, mask, centerlines, scene.centerlines, out_dir / "demo_scene_overview.png"
    )
    detail = overview_picture(
        scene.image, mask, centerlines, scene.centerlines, out_dir / "demo_scene_detail.png", detail_px=400
    )
    summary = {
        "model": model,
        "scene": {
            "image": str(scene.image),
            "truth_mask": str(scene.truth_mask),
            "centerlines": str(scene.centerlines),
            "size_px": [height_px, width_px],
            "gsd_m": scene.gsd_m,
            "crs": scene.crs,
        },
        "prediction": {"mask": str(mask), "windows": entry["windows_run"], "seconds": entry["seconds"]},
        "network": {"centerlines": str(centerlines), "polygons": vectors["tiles"][0]["polygons"]},
        "scores": scores,
        "overview": str(picture),
        "detail": str(detail),
    }
    (out_dir / "scene_demo.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary
