"""Large-area inference: rasters in, georeferenced COG masks out, the same whatever the engine or batching."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

rasterio = pytest.importorskip("rasterio")

from sidewalk_hf import (
    SidewalkDeepLabConfig,
    SidewalkDeepLabForSemanticSegmentation,
    SidewalkImageProcessor,
    save_pretrained_with_processor,
)
from sidewalk_hf.data.scene import split_into_tiles, write_mosaic_vrt, write_scene
from sidewalk_hf.geo.raster import PixelRule, RasterInputError
from sidewalk_hf.inference import InferenceOptions, OutputFolderError, WindowGrid, predict_rasters, seam_ratio
from sidewalk_hf.inference.windows import blend_weights, window_starts

REPO = Path(__file__).resolve().parents[1]
PREDICT = [sys.executable, str(REPO / "scripts" / "predict.py")]
TINY = {
    "backbone": "test_resnet",
    "res5_multi_grid": [1],
    "aspp_channels": 16,
    "project_channels": 8,
    "decoder_channels": 16,
}
WINDOW = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = SidewalkDeepLabConfig(**TINY, training_chip_size_px=WINDOW)
    model = SidewalkDeepLabForSemanticSegmentation(config).eval()
    with torch.no_grad():  # logits large enough for both classes to show up
        model.decode_head.classifier.weight.mul_(3000.0)
    directory = tmp_path_factory.mktemp("tiny_model")
    save_pretrained_with_processor(model, SidewalkImageProcessor.from_model_config(config), directory)
    return directory


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    common = {"height_px": 150, "width_px": 190, "seed": 3, "gsd_m": 0.5, "nodata_border_px": 70}
    return {
        "rgb8": write_scene(root, "rgb8", **common),
        "nrgb16": write_scene(root, "nrgb16", num_bands=4, dtype="uint16", **common),
        "feet": write_scene(root, "feet", crs="EPSG:3424", height_px=100, width_px=120, seed=4),
    }


def _options(**changes) -> InferenceOptions:
    base = {"window_px": WINDOW, "batch_size": 4, "num_workers": 0, "write_probs": True}
    return InferenceOptions(**(base | changes))


def _predict(model_dir, inputs, out, **kwargs):
    options = kwargs.pop("options", None) or _options()
    return predict_rasters(str(model_dir), [str(i) for i in inputs], out, options, device="cpu", **kwargs)


def _predict_args(model_dir, inputs, out) -> list[str]:
    """scripts/predict.py's arguments for the in-process ``_options()`` defaults, vectors off."""
    return [
        "--model",
        str(model_dir),
        "--input",
        *map(str, inputs),
        "--out",
        str(out),
        "--window-px",
        str(WINDOW),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--write-probs",
        "--no-vectors",
    ]


def _read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.profile, src.tags()


# ---- windows and blending ------------------------------------------------------------------------------


def test_windows_overlap_and_the_last_one_is_flush_with_the_edge():
    assert window_starts(300, 64, 48) == [0, 48, 96, 144, 192, 236]
    assert window_starts(50, 64, 48) == [0]  # a raster smaller than a window gets one window of its size
    assert WindowGrid.for_raster(50, 300, 64, 0.75).window_shape == (50, 64)


def test_blend_weights_are_positive_and_peak_in_the_middle():
    weights = blend_weights((64, 64), "cosine")
    assert weights.min() > 0 and weights[32, 32] == weights.max() and weights[0, 0] < 0.01


def test_seam_ratio_detects_class_flips_on_window_borders():
    from scipy.ndimage import gaussian_filter

    grid = WindowGrid.for_raster(256, 256, 64, 1.0)
    rng = np.random.default_rng(0)
    field = gaussian_filter(rng.standard_normal((280, 280)), 3)  # 12 px margin for the shifts
    classes = (field[12:268, 12:268] > 0.05).astype(np.uint8)  # blobs: flips on their edges only
    seamed = classes.copy()
    for y0 in grid.row_starts:  # every window sees the scene shifted a little: misaligned at its borders
        for x0 in grid.col_starts:
            dy, dx = rng.integers(-6, 7, 2)
            seamed[y0 : y0 + 64, x0 : x0 + 64] = (
                field[12 + y0 + dy : 76 + y0 + dy, 12 + x0 + dx : 76 + x0 + dx] > 0.05
            )
    assert seam_ratio(classes, grid)["seam_ratio"] == pytest.approx(1.0, abs=0.3)
    assert seam_ratio(seamed, grid)["seam_ratio"] > 3


# ---- outputs ----------------------------------------------------------------------------------------------


def test_outputs_are_cogs_in_the_inputs_crs_and_grid_with_nodata_kept(model_dir, scenes, tmp_path):
    scene = scenes["rgb8"]
    manifest = _predict(model_dir, [scene.image], tmp_path)
    entry = manifest["inputs"][str(scene.image.resolve())]
    assert entry["status"] == "ok" and entry["windows_nodata"] > 0  # the all-nodata windows were not run
    truth, truth_profile, _ = _read(scene.truth_mask)
    for kind in ("mask", "prob"):
        path = tmp_path / f"rgb8.{kind}.tif"
        with rasterio.open(path) as src:
            assert src.crs == truth_profile["crs"] and src.transform == truth_profile["transform"]
            assert (src.width, src.height, src.dtypes[0], src.nodata) == (190, 150, "uint8", 255)
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert src.profile["tiled"] and src.overviews(1) == [] or src.profile["tiled"]
            data = src.read(1)
        assert np.array_equal(data == 255, truth == 255)  # source nodata stays nodata, nothing else does
    mask = _read(tmp_path / "rgb8.mask.tif")[0]
    assert set(np.unique(mask)) <= {0, 1, 255} and {0, 1} <= set(np.unique(mask))
    assert (
        entry["outputs"]["mask"]["sha256"]
        and json.loads((tmp_path / "run.json").read_text())["summary"]["ok"] == 1
    )


def test_a_large_mask_has_overviews(model_dir, tmp_path):
    scene = write_scene(tmp_path / "in", "big", height_px=40, width_px=1100, seed=1)
    _predict(model_dir, [scene.image], tmp_path / "out", options=_options(batch_size=16, write_probs=False))
    with rasterio.open(tmp_path / "out" / "big.mask.tif") as src:
        assert src.overviews(1) and src.block_shapes[0] == (512, 512)


def test_us_survey_feet_raster_keeps_its_crs(model_dir, scenes, tmp_path):
    _predict(model_dir, [scenes["feet"].image], tmp_path)
    with rasterio.open(tmp_path / "feet.mask.tif") as src, rasterio.open(scenes["feet"].image) as ref:
        assert src.crs.to_epsg() == 3424 and src.transform == ref.transform


def test_16_bit_4_band_input_with_bands_and_scale_equals_the_8_bit_input(model_dir, scenes, tmp_path):
    _predict(model_dir, [scenes["rgb8"].image], tmp_path / "a")
    rule = PixelRule.parse("2,3,4", "fixed:0,65535")
    _predict(model_dir, [scenes["nrgb16"].image], tmp_path / "b", options=_options(rule=rule))
    for kind in ("mask", "prob"):
        assert np.array_equal(
            _read(tmp_path / "a" / f"rgb8.{kind}.tif")[0], _read(tmp_path / "b" / f"nrgb16.{kind}.tif")[0]
        )
    tags = _read(tmp_path / "b" / "nrgb16.mask.tif")[2]
    assert "fixed:0,65535" in tags["SIDEWALK_PIXEL_RULE"] and "2,3,4" in tags["SIDEWALK_PIXEL_RULE"]


def test_percentile_scaling_is_computed_once_and_recorded(model_dir, scenes, tmp_path):
    rule = PixelRule.parse("2,3,4", "percentiles:2,98")
    manifest = _predict(model_dir, [scenes["nrgb16"].image], tmp_path, options=_options(rule=rule))
    ranges = manifest["pixel_rule"]["ranges"]
    assert len(ranges) == 3 and all(0 < lo < hi < 65535 for lo, hi in ranges)


def test_predictions_do_not_depend_on_batch_size_or_workers(model_dir, scenes, tmp_path):
    _predict(model_dir, [scenes["rgb8"].image], tmp_path / "a", options=_options(batch_size=1, num_workers=0))
    _predict(model_dir, [scenes["rgb8"].image], tmp_path / "b", options=_options(batch_size=7, num_workers=2))
    for kind in ("mask", "prob"):
        assert np.array_equal(
            _read(tmp_path / "a" / f"rgb8.{kind}.tif")[0], _read(tmp_path / "b" / f"rgb8.{kind}.tif")[0]
        )


def test_the_mask_does_not_depend_on_writing_probabilities_and_agrees_with_them(model_dir, scenes, tmp_path):
    _predict(model_dir, [scenes["rgb8"].image], tmp_path / "a", options=_options(write_probs=False))
    _predict(model_dir, [scenes["rgb8"].image], tmp_path / "b")
    assert not (tmp_path / "a" / "rgb8.prob.tif").exists()
    mask = _read(tmp_path / "a" / "rgb8.mask.tif")[0]
    assert np.array_equal(mask, _read(tmp_path / "b" / "rgb8.mask.tif")[0])
    prob = _read(tmp_path / "b" / "rgb8.prob.tif")[0]
    valid = mask != 255
    assert np.array_equal(valid, prob != 255)
    assert (mask[valid & (prob >= 128)] == 1).all() and (mask[valid & (prob <= 126)] == 0).all()
    assert {0, 1} <= set(np.unique(mask[valid]))


def test_a_vrt_mosaic_of_four_tiles_equals_the_single_raster(model_dir, scenes, tmp_path):
    tiles = split_into_tiles(scenes["rgb8"].image, 2, 2, tmp_path / "tiles")
    mosaic = write_mosaic_vrt(tiles, tmp_path / "rgb8.vrt")
    _predict(model_dir, [scenes["rgb8"].image], tmp_path / "whole")
    _predict(model_dir, [mosaic], tmp_path / "mosaic")
    whole, whole_profile, _ = _read(tmp_path / "whole" / "rgb8.mask.tif")
    tiled, tiled_profile, _ = _read(tmp_path / "mosaic" / "rgb8.mask.tif")
    assert np.array_equal(whole, tiled) and whole_profile["transform"] == tiled_profile["transform"]


def test_a_raster_smaller_than_a_window_works(model_dir, tmp_path):
    scene = write_scene(tmp_path / "in", "small", height_px=40, width_px=50, seed=2)
    manifest = _predict(model_dir, [scene.image], tmp_path / "out")
    assert manifest["summary"]["ok"] == 1 and _read(tmp_path / "out" / "small.mask.tif")[0].shape == (40, 50)


def test_a_raster_without_crs_runs_with_a_recorded_warning(model_dir, tmp_path):
    path = tmp_path / "plain.tif"
    data = np.random.default_rng(0).integers(1, 255, (3, 70, 70), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=70, height=70, count=3, dtype="uint8") as dst:
        dst.write(data)
    manifest = _predict(model_dir, [path], tmp_path / "out")
    entry = manifest["inputs"][str(path.resolve())]
    assert entry["status"] == "ok" and any("no CRS" in w for w in entry["warnings"])


# ---- errors ------------------------------------------------------------------------------------------------


def test_band_count_mismatch_fails_naming_both_counts(model_dir, scenes, tmp_path):
    manifest = _predict(
        model_dir,
        [scenes["nrgb16"].image],
        tmp_path,
        options=_options(rule=PixelRule.parse(None, "fixed:0,65535")),
    )
    error = manifest["inputs"][str(scenes["nrgb16"].image.resolve())]["error"]
    assert "4 band(s) selected" in error and "model takes 3" in error and "nrgb16.tif" in error


def test_wrong_band_numbers_fail_naming_the_raster(model_dir, scenes, tmp_path):
    manifest = _predict(
        model_dir, [scenes["rgb8"].image], tmp_path, options=_options(rule=PixelRule.parse("1,2,9", None))
    )
    assert "asks for band(s) [9]" in manifest["inputs"][str(scenes["rgb8"].image.resolve())]["error"]


def test_an_output_folder_of_another_run_needs_resume_or_overwrite(model_dir, scenes, tmp_path):
    _predict(model_dir, [scenes["feet"].image], tmp_path)
    with pytest.raises(OutputFolderError, match="--resume"):
        _predict(model_dir, [scenes["feet"].image], tmp_path)
    assert _predict(model_dir, [scenes["feet"].image], tmp_path, overwrite=True)["summary"]["ok"] == 1
    with pytest.raises(OutputFolderError, match="other parameters"):
        _predict(
            model_dir, [scenes["feet"].image], tmp_path, resume=True, options=_options(stride_fraction=0.5)
        )


def test_two_inputs_with_the_same_name_are_refused(model_dir, scenes, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "rgb8.tif").write_bytes(scenes["rgb8"].image.read_bytes())
    with pytest.raises(RasterInputError, match="same outputs"):
        _predict(model_dir, [scenes["rgb8"].image, other / "rgb8.tif"], tmp_path / "out")


def test_a_failing_input_is_recorded_and_the_others_finish(model_dir, scenes, tmp_path):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + os.urandom(2000))
    out = tmp_path / "out"
    result = subprocess.run(
        [
            *PREDICT,
            "--model",
            str(model_dir),
            "--input",
            str(broken),
            str(scenes["feet"].image),
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "--no-vectors",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert f"FAILED {broken.resolve()}" in result.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["inputs"][str(broken.resolve())]["status"] == "failed"
    assert "cannot be opened as a raster" in manifest["inputs"][str(broken.resolve())]["error"]
    assert manifest["inputs"][str(scenes["feet"].image.resolve())]["status"] == "ok"
    assert not list(out.glob(".*tmp*")) and not (out / "broken.mask.tif").exists()


# ---- resume and engines ------------------------------------------------------------------------------------


def _digests(out: Path) -> dict:
    from sidewalk_hf.inference.outputs import sha256_of

    return {p.name: sha256_of(p) for p in sorted(out.glob("*.tif"))}


@pytest.mark.slow
def test_a_run_killed_and_resumed_gives_the_same_files(model_dir, tmp_path):
    inputs = [
        write_scene(tmp_path / "in", f"t{i}", height_px=120, width_px=400, seed=i).image for i in range(3)
    ]
    _predict(model_dir, inputs, tmp_path / "straight")
    out = tmp_path / "killed"
    command = [*PREDICT, *_predict_args(model_dir, inputs, out), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        parts = [json.loads(p.read_text()) for p in out.glob("run.part-*.json")] if out.exists() else []
        if any(len(p["parts"]) >= 1 for p in parts):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "run.json").exists()  # killed before the end
    finished = {p.name for p in out.glob("*.mask.tif")}
    assert 1 <= len(finished) < 3
    subprocess.run([*command, "--resume"], check=True, timeout=300, capture_output=True)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["summary"]["ok"] == 3
    assert sum(bool(e.get("resumed")) for e in manifest["inputs"].values()) >= 1
    assert _digests(out) == _digests(tmp_path / "straight")
    assert not list(out.glob(".*")) and not list(out.glob("run.part-*"))


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_equal_one(model_dir, scenes, tmp_path):
    one = tmp_path / "one"
    _predict(model_dir, [scenes["rgb8"].image], one)
    for name, inputs in (
        ("split", [scenes["rgb8"].image]),
        ("shared", [scenes["rgb8"].image, scenes["feet"].image]),
    ):
        out = tmp_path / name
        env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--main_process_port",
                str(29700 + os.getpid() % 200),
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                str(REPO / "scripts" / "predict.py"),
                *_predict_args(model_dir, inputs, out),
            ],
            check=True,
            timeout=400,
            env=env,
            capture_output=True,
        )
        manifest = json.loads((out / "run.json").read_text())
        assert manifest["num_processes"] == 2 and manifest["summary"]["ok"] == len(inputs)
        for kind in ("mask", "prob"):
            assert np.array_equal(_read(one / f"rgb8.{kind}.tif")[0], _read(out / f"rgb8.{kind}.tif")[0]), (
                name,
                kind,
            )
        assert not list(out.glob(".*")), list(out.glob(".*"))


@pytest.mark.slow
def test_the_ray_engine_on_a_local_cluster_equals_the_local_engine(model_dir, scenes, tmp_path):
    ray = pytest.importorskip("ray")
    inputs = [scenes["rgb8"].image, scenes["feet"].image]
    _predict(model_dir, inputs, tmp_path / "local")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a raster")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        manifest = _predict(model_dir, [*inputs, broken], tmp_path / "ray", engine="ray", ray_num_actors=2)
    finally:
        ray.shutdown()
    assert manifest["engine"] == "ray" and manifest["summary"] == {
        "ok": 2,
        "failed": 1,
        "skipped": 0,
        "inputs": 3,
    }
    for name in ("rgb8.mask.tif", "rgb8.prob.tif", "feet.mask.tif"):
        assert np.array_equal(_read(tmp_path / "local" / name)[0], _read(tmp_path / "ray" / name)[0]), name


def test_inference_options_come_from_the_config_and_a_wrong_key_is_named(model_dir, scenes, tmp_path):
    config = tmp_path / "predict.yaml"
    config.write_text("INFERENCE:\n  WINDOW_PX: 48\n  NUM_WORKERS: 0\n  VECTORS: false\n")
    out = tmp_path / "out"
    common = [*PREDICT, "--model", str(model_dir), "--input", str(scenes["feet"].image), "--out", str(out)]
    subprocess.run(
        [*common, "--config", str(config), "--device", "cpu"], check=True, capture_output=True, timeout=300
    )
    assert json.loads((out / "run.json").read_text())["parameters"]["window_px"] == 48
    wrong = subprocess.run(
        [*common, "--opts", "INFERENCE.BLND", "gaussian"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 2 and "INFERENCE.BLEND" in wrong.stderr
