"""The demo Space as people use it: the app launched on localhost, driven by gradio_client and by a real
headless Chromium (Playwright), with a tiny model; its masks are the library's own prediction."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the demo Space needs gradio: pip install -e '.[space]'")
gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client: pip install -e '.[space]'")

from sidewalk_hf import (
    SidewalkDeepLabConfig,
    SidewalkDeepLabForSemanticSegmentation,
    SidewalkImageProcessor,
    save_pretrained_with_processor,
)

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "space" / "app.py"
EXAMPLE_CHIP = REPO / "space" / "examples" / "chip_0.png"
EXAMPLE_GEOTIFF = REPO / "space" / "examples" / "scene.tif"
CHROMIUM = Path("/usr/lib/chromium/chromium-headless-shell")
CHROMIUM_FLAGS = [
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TINY = {
    "backbone": "test_resnet",
    "res5_multi_grid": [1],
    "aspp_channels": 16,
    "decoder_channels": 16,
    "project_channels": 8,
}
SERVER_START_TIMEOUT_S = 120
BROWSER_TIMEOUT_MS = 120_000  # what takes a second on a quiet machine can take a while beside the suite
APP_LOGS: dict[str, Path] = {}  # each launched app's log, by its URL
pytestmark = pytest.mark.slow  # each module launches the app (and a browser) once


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = SidewalkDeepLabForSemanticSegmentation(SidewalkDeepLabConfig(**TINY)).eval()
    with torch.no_grad():  # logits large enough for both classes, small enough for probabilities in between
        model.decode_head.classifier.weight.mul_(300.0)
    directory = tmp_path_factory.mktemp("tiny_space_model")
    save_pretrained_with_processor(model, SidewalkImageProcessor.from_model_config(model.config), directory)
    return directory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    """`python space/app.py` on a free localhost port, ready once its API answers."""
    work = tmp_path_factory.mktemp("space_app")
    port = _free_port()
    env = {
        **os.environ,
        "SIDEWALK_MODEL": str(tiny_model_dir),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(work / "gradio"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    log_path = work / "app.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(APP)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    APP_LOGS[url] = log_path
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "gradio_api/info", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the app did not answer within {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()}"
                )
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(app_url):
    return gradio_client.Client(app_url, verbose=False)


@contextlib.contextmanager
def one_thread():
    """Run the library's own prediction on one thread, as the app server does (OMP_NUM_THREADS=1), so that
    float reductions and hence near-tie pixels are the same on both sides."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _library_sidewalk_probability(model_dir: Path, image: Image.Image) -> np.ndarray:
    model = SidewalkDeepLabForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = SidewalkImageProcessor.from_pretrained(model_dir)
    with torch.inference_mode(), one_thread():
        logits = model(**processor(images=image, return_tensors="pt")).logits
    return logits.softmax(1)[0, 1].numpy()


def _returned_mask(result) -> np.ndarray:
    (mask_path,) = result[3]
    return np.asarray(Image.open(mask_path))


def test_the_returned_mask_is_the_library_pipelines_prediction(client, tiny_model_dir):
    from transformers import pipeline

    result = client.predict(gradio_client.handle_file(str(EXAMPLE_CHIP)), 0.5, 0.25, "", api_name="/segment")
    overlay, probability_picture, centerlines, _, status = result
    mask = _returned_mask(result)

    with one_thread():
        segments = pipeline("image-segmentation", model=str(tiny_model_dir))(Image.open(EXAMPLE_CHIP))
    expected = next(s["mask"] for s in segments if s["label"] == "sidewalk")
    np.testing.assert_array_equal(mask, (np.asarray(expected) == 255).astype(np.uint8))
    assert 0 < mask.mean() < 1  # both classes present: the comparison means something

    # The overlay is the chip with one "sidewalk" annotation covering exactly the mask.
    assert np.array_equal(
        np.asarray(Image.open(overlay["image"]).convert("RGB")), np.asarray(Image.open(EXAMPLE_CHIP))
    )
    (annotation,) = overlay["annotations"]
    assert annotation["label"] == "sidewalk"
    np.testing.assert_array_equal(np.asarray(Image.open(annotation["image"]))[..., 3] > 0, mask == 1)
    assert Image.open(probability_picture).size == Image.open(EXAMPLE_CHIP).size
    assert centerlines is None  # centerlines are for GeoTIFFs
    assert f"sidewalk on {mask.mean():.1%} of the pixels" in status


def test_the_threshold_slider_sets_the_probability_cut(client, tiny_model_dir):
    probability = _library_sidewalk_probability(tiny_model_dir, Image.open(EXAMPLE_CHIP).convert("RGB"))
    strict = _returned_mask(
        client.predict(gradio_client.handle_file(str(EXAMPLE_CHIP)), 0.8, 0.25, "", api_name="/segment")
    )
    loose = _returned_mask(
        client.predict(gradio_client.handle_file(str(EXAMPLE_CHIP)), 0.2, 0.25, "", api_name="/segment")
    )
    away_from_cut = np.abs(probability - 0.8) > 1e-5  # float rounding may flip pixels on the cut itself
    np.testing.assert_array_equal(strict[away_from_cut], (probability > 0.8)[away_from_cut])
    assert strict.sum() < loose.sum() and np.all(loose >= strict)


def test_a_file_that_is_no_image_gets_a_message_not_a_stack_trace(client, tmp_path):
    fake = tmp_path / "chip.png"
    fake.write_text("this is not a PNG")
    with pytest.raises(gradio_client.exceptions.AppError) as raised:
        client.predict(gradio_client.handle_file(str(fake)), 0.5, 0.25, "", api_name="/segment")
    message = str(raised.value)
    assert "`chip.png` is not a readable PNG or JPEG image." in message
    assert "Traceback" not in message


@pytest.fixture(scope="module")
def library_prediction(tiny_model_dir, tmp_path_factory):
    """What the package's own inference and vector stage make of the example GeoTIFF (the app's defaults:
    the model's window, 25% overlap)."""
    from sidewalk_hf.inference import InferenceOptions, predict_rasters
    from sidewalk_hf.network.vectorize import vectorize_raster

    out = tmp_path_factory.mktemp("library_prediction")
    options = InferenceOptions(window_px=0, stride_fraction=0.75, write_probs=True, num_workers=0)
    with one_thread():
        predict_rasters(str(tiny_model_dir), [str(EXAMPLE_GEOTIFF)], out, options)
    vectorize_raster(out / "scene.mask.tif", out / "vectors", tile_name="scene")
    return out


def _raster(path):
    import rasterio

    with rasterio.open(path) as dataset:
        return dataset.read(1), dataset.crs, dataset.transform


def test_a_geotiff_gives_the_librarys_mask_and_centerlines_georeferenced(client, library_prediction):
    result = client.predict(
        gradio_client.handle_file(str(EXAMPLE_GEOTIFF)), 0.5, 0.25, "", api_name="/segment"
    )
    overlay, _, centerlines_picture, downloads, status = result
    by_name = {Path(path).name: Path(path) for path in downloads}
    assert sorted(by_name) == ["scene.centerlines.geojson", "scene.mask.tif", "scene.prob.tif"]

    mask, crs, transform = _raster(by_name["scene.mask.tif"])
    expected, expected_crs, expected_transform = _raster(library_prediction / "scene.mask.tif")
    np.testing.assert_array_equal(mask, expected)
    assert 0 < (mask == 1).mean() < 1
    assert crs == expected_crs == "EPSG:32618" and transform == expected_transform
    lines = json.loads(by_name["scene.centerlines.geojson"].read_text())
    expected_lines = json.loads((library_prediction / "vectors" / "scene.centerlines.geojson").read_text())
    assert lines["features"] and lines["features"] == expected_lines["features"]

    (sidewalk,) = overlay["annotations"]  # no nodata in the example
    np.testing.assert_array_equal(np.asarray(Image.open(sidewalk["image"]))[..., 3] > 0, mask == 1)
    drawn = np.asarray(Image.open(centerlines_picture).convert("RGB"))
    assert drawn.shape[:2] == mask.shape
    assert (np.all(drawn == (255, 212, 0), axis=-1)).sum() > 100  # the centerlines are drawn
    assert "EPSG:32618" in status and "centerline segments" in status


def test_a_geotiffs_threshold_cuts_the_librarys_probabilities(client, library_prediction):
    result = client.predict(
        gradio_client.handle_file(str(EXAMPLE_GEOTIFF)), 0.7, 0.25, "", api_name="/segment"
    )
    mask, _, _ = _raster(next(p for p in result[3] if p.endswith(".mask.tif")))
    probability, _, _ = _raster(library_prediction / "scene.prob.tif")
    expected = np.where(probability == 255, 255, probability.astype(np.float32) / 254 >= 0.7)
    np.testing.assert_array_equal(mask, expected)
    assert "threshold 0.70" in result[4]


def test_a_geotiff_with_the_wrong_band_count_gets_a_message(client, tmp_path):
    from sidewalk_hf.data.scene import write_scene

    scene = write_scene(tmp_path, "four_band", height_px=64, width_px=64, num_bands=4)
    with pytest.raises(gradio_client.exceptions.AppError) as raised:
        client.predict(gradio_client.handle_file(str(scene.image)), 0.5, 0.25, "", api_name="/segment")
    assert "`four_band.tif` has 4 band(s); the model takes 3. Enter the 3 bands" in str(raised.value)


# ---- a real browser --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="needs playwright: pip install -e '.[space]'"
    )
    if not CHROMIUM.is_file():
        pytest.skip(f"no headless Chromium at {CHROMIUM}: apt-get install -y chromium-headless-shell")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.app_url = app_url
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    page.console_messages = []  # what the page logged, for a failure's message
    page.on("console", lambda message: page.console_messages.append(f"{message.type}: {message.text}"))
    page.on("requestfailed", lambda request: page.console_messages.append(f"failed: {request.url}"))
    page.goto(app_url, wait_until="load")
    page.wait_for_selector("#run", timeout=BROWSER_TIMEOUT_MS)
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=BROWSER_TIMEOUT_MS)
    yield page
    page.close()


def _upload_and_run(page, path: Path) -> None:
    """Choose the file in the upload box as a visitor does, wait until the box holds it, press the button.

    While uploading the box shows "Uploading 1 file... <name>"; once it holds the file it shows the name's
    stem and suffix in two elements, so that is what is waited for (the first state can pass too quickly
    to be seen). A file that never shows is reported with what the page and the server said."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    page.set_input_files("#upload input[type=file]", str(path))
    try:
        page.wait_for_function(
            """([stem, suffix]) => {
                const text = document.querySelector('#upload').innerText;
                return text.includes(stem) && text.includes(suffix) && !text.includes('Uploading');
            }""",
            arg=[path.stem, path.suffix],
            timeout=BROWSER_TIMEOUT_MS,
        )
    except PlaywrightTimeoutError:
        pytest.fail(
            f"{path.name} did not show in the upload box within {BROWSER_TIMEOUT_MS / 1000:.0f} s.\n"
            f"upload box: {page.inner_text('#upload')!r}\n"
            "page log:\n" + "\n".join(page.console_messages[-40:]) + "\n"
            f"server log:\n{APP_LOGS[page.app_url].read_text()[-3000:]}"
        )
    page.click("#run")


def test_in_a_browser_an_uploaded_example_shows_its_sidewalk_overlay(page, tmp_path):
    _upload_and_run(page, EXAMPLE_CHIP)
    page.wait_for_selector("#overlay img.mask", state="visible", timeout=BROWSER_TIMEOUT_MS)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#overlay img')].every(img => img.complete && img.naturalWidth > 0)",
        timeout=BROWSER_TIMEOUT_MS,
    )
    page.wait_for_selector("#status :text('sidewalk on')", timeout=BROWSER_TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "space.png"), full_page=True)

    shown = Image.open(io.BytesIO(page.locator("#overlay img.base-image").screenshot())).convert("RGB")
    pixels = np.asarray(shown, dtype=np.float32)
    assert pixels.std() > 10, "the overlay image is blank"
    assert page.locator('[data-testid="toast-body"].error').count() == 0
    assert "Error" not in page.inner_text("#status")
    assert (tmp_path / "space.png").stat().st_size > 10_000


def test_in_a_browser_a_geotiff_shows_its_centerlines_and_downloads(page, tmp_path):
    _upload_and_run(page, EXAMPLE_GEOTIFF)
    page.wait_for_selector("#centerlines img", state="visible", timeout=BROWSER_TIMEOUT_MS)
    page.wait_for_selector("#status :text('centerline segments')", timeout=BROWSER_TIMEOUT_MS)
    for name in ("scene.mask.tif", "scene.centerlines.geojson", "scene.prob.tif"):
        link = page.locator(f"#downloads a[download='{name}']")
        assert link.count() == 1, name
        response = page.request.get(link.get_attribute("href"))
        assert response.ok and len(response.body()) > 1000, name
    shown = Image.open(io.BytesIO(page.locator("#centerlines img").screenshot())).convert("RGB")
    assert np.asarray(shown, dtype=np.float32).std() > 10, "the centerlines picture is blank"
    assert page.locator('[data-testid="toast-body"].error').count() == 0
    page.screenshot(path=str(tmp_path / "space_geotiff.png"), full_page=True)


def test_in_a_browser_a_bad_upload_shows_a_message(page, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    _upload_and_run(page, fake)
    toast = page.wait_for_selector('[data-testid="toast-body"].error', timeout=BROWSER_TIMEOUT_MS)
    text = toast.inner_text()
    assert "`notes.png` is not a readable PNG or JPEG image." in text
    assert "Traceback" not in text
    page.screenshot(path=str(tmp_path / "error.png"))
