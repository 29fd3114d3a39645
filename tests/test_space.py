"""The demo Space folder: its card and requirements, its examples, how the app finds a model and words its
errors, and its publication beside the model (only the Hub's HTTP API is replaced)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import runpy
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from datasets import Image as Image_
from datasets import load_dataset
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from packaging.requirements import Requirement
from PIL import Image

from sidewalk_hf import (
    SidewalkDeepLabConfig,
    SidewalkDeepLabForSemanticSegmentation,
    SidewalkImageProcessor,
    save_pretrained_with_processor,
)
from sidewalk_hf.data.synthetic import JPEG_QUALITY, generate_synthetic_dataset
from sidewalk_hf.hub import write_model_card
from sidewalk_hf.space import (
    SPACE_DIR,
    publish_space,
    render_space_card,
    space_card_metadata,
    space_files,
    write_space_examples,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "backbone": "test_resnet",
    "res5_multi_grid": [1],
    "aspp_channels": 16,
    "decoder_channels": 16,
    "project_channels": 8,
}
RESULTS = {
    "validation": {
        "mean_iou": 0.7,
        "background_iou": 0.9,
        "sidewalk_iou": 0.5,
        "pixel_accuracy": 0.95,
        "per_category_accuracy": [0.97, 0.6],
    }
}


def _pinned_requirements() -> dict[str, Requirement]:
    lines = (SPACE_DIR / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {re.sub(r"[-_.]+", "-", r.name.lower()): r for r in requirements}


def test_space_card_has_the_gradio_front_matter_of_the_installed_gradio():
    metadata = space_card_metadata((SPACE_DIR / "README.md").read_text())
    assert metadata["sdk"] == "gradio"
    assert metadata["app_file"] == "app.py" and (SPACE_DIR / metadata["app_file"]).is_file()
    assert metadata["license"] == "apache-2.0"
    assert "models" in metadata
    if importlib.util.find_spec("gradio") is not None:
        assert metadata["sdk_version"] == version("gradio")


def test_requirements_pin_every_dependency_of_the_package_and_gradio():
    pinned = _pinned_requirements()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["geo"]]
    needed.append(
        Requirement(next(r for r in project["optional-dependencies"]["space"] if r.startswith("gradio=")))
    )
    for requirement in needed:
        name = re.sub(r"[-_.]+", "-", requirement.name.lower())
        assert name in pinned, f"{requirement.name} is missing from space/requirements.txt"
        (spec,) = pinned[name].specifier
        assert spec.operator == "==", f"{pinned[name]} is not pinned"
        assert requirement.specifier.contains(spec.version), f"{pinned[name]} does not satisfy {requirement}"
    card = space_card_metadata((SPACE_DIR / "README.md").read_text())
    assert str(pinned["gradio"].specifier) == f"=={card['sdk_version']}"


def test_the_committed_examples_are_what_the_script_writes(tmp_path):
    written = runpy.run_path(str(REPO / "scripts" / "make_space_examples.py"))["main"]
    written(["--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in (SPACE_DIR / "examples").iterdir())
    for name in names:
        if name.endswith(".tif"):
            import rasterio

            with rasterio.open(tmp_path / name) as new, rasterio.open(SPACE_DIR / "examples" / name) as old:
                assert new.count == 3 and new.crs == old.crs and new.transform == old.transform
                assert np.array_equal(new.read(), old.read())
        else:
            assert np.array_equal(
                np.asarray(Image.open(tmp_path / name)), np.asarray(Image.open(SPACE_DIR / "examples" / name))
            )
        assert (tmp_path / name).stat().st_size < 500_000


def test_example_chips_are_the_synthetic_datasets_test_chips(tmp_path):

    dataset = generate_synthetic_dataset(tmp_path / "ds", 0, 0, 1, chip_size_px=128, seed=0, num_shards=1)
    (chip,) = write_space_examples(tmp_path / "examples", num_chips=1, scene_size_px=0)

    record = next(
        iter(
            load_dataset(str(dataset), split="test", streaming=True).cast_column(
                "image", Image_(decode=False)
            )
        )
    )
    # The dataset stores the rendered pixels as JPEG (quality 90), the PNG example stores them losslessly.
    encoded = io.BytesIO()
    Image.open(chip).save(encoded, format="JPEG", quality=JPEG_QUALITY)
    assert encoded.getvalue() == record["image"]["bytes"]


# ---- the app, in this process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app():
    pytest.importorskip("gradio", reason="the demo Space needs gradio: pip install -e '.[space]'")
    spec = importlib.util.spec_from_file_location("space_app_under_test", SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = SidewalkDeepLabForSemanticSegmentation(SidewalkDeepLabConfig(**TINY)).eval()
    directory = tmp_path_factory.mktemp("tiny") / "best"
    save_pretrained_with_processor(model, SidewalkImageProcessor.from_model_config(model.config), directory)
    return directory


def test_the_app_takes_sidewalk_model_then_the_newest_demo_run_then_the_cards_model(
    app, monkeypatch, tmp_path
):
    monkeypatch.setattr(app, "APP_DIR", tmp_path / "space")
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "README.md").write_text(
        render_space_card((SPACE_DIR / "README.md").read_text(), "org/m")
    )
    monkeypatch.delenv("SIDEWALK_MODEL", raising=False)
    assert app.model_source() == "org/m"
    for run in ("20260101-000000-demo", "20260301-000000-demo", "20260201-000000-demo"):
        (tmp_path / "runs" / run / "best").mkdir(parents=True)
        (tmp_path / "runs" / run / "best" / "model.safetensors").write_bytes(b"")
    assert app.model_source() == str(tmp_path / "runs" / "20260301-000000-demo" / "best")
    monkeypatch.setenv("SIDEWALK_MODEL", "org/other")
    assert app.model_source() == "org/other"


def test_without_a_model_the_page_says_how_to_get_one(app, monkeypatch, tmp_path):
    monkeypatch.setattr(app, "APP_DIR", tmp_path)
    monkeypatch.delenv("SIDEWALK_MODEL", raising=False)
    assert "SIDEWALK_MODEL" in app.model_status() and "make demo" in app.model_status()
    chip = tmp_path / "chip.png"
    Image.new("RGB", (32, 32)).save(chip)
    with pytest.raises(app.gr.Error, match="No model is loaded.*SIDEWALK_MODEL"):
        app.segment(str(chip), 0.5, 0.25)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: Image.new("L", (32, 32)).save(p),
            r"`bad.png` has 1 band\(s\) \(L\); the model takes 3-band RGB",
        ),
        (
            lambda p: Image.new("RGB", (2049, 8)).save(p),
            r"`bad.png` is 2049 x 8 px; chips up to 2048 px a side",
        ),
        (
            lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
            r"`bad.png` is not a readable PNG or JPEG",
        ),
        (
            lambda p: p.write_bytes(Path(SPACE_DIR / "examples" / "chip_0.png").read_bytes()[:2000]),
            "could not be decoded",
        ),
    ],
    ids=["greyscale", "too-large", "not-an-image", "truncated"],
)
def test_a_bad_chip_gets_a_message_naming_the_file(app, monkeypatch, tiny_model_dir, tmp_path, make, message):
    monkeypatch.setenv("SIDEWALK_MODEL", str(tiny_model_dir))
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(app.gr.Error, match=message):
        app.segment(str(path), 0.5, 0.25)


def _write_geotiff(path: Path, height: int, width: int, *, georeferenced: bool = True) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    pixels = np.random.default_rng(0).integers(0, 256, (3, height, width), dtype=np.uint8)
    geo = (
        {"crs": "EPSG:32618", "transform": from_origin(560_000, 4_460_000, 0.5, 0.5)} if georeferenced else {}
    )
    with rasterio.open(
        path, "w", driver="GTiff", height=height, width=width, count=3, dtype="uint8", **geo
    ) as out:
        out.write(pixels)
    return path


@pytest.mark.parametrize(
    ("make", "bands", "message"),
    [
        (
            lambda p: _write_geotiff(p, 4097, 4),
            "",
            r"`bad.tif` is 4 x 4097 px; GeoTIFFs up to 4096 x 4096 px",
        ),
        (lambda p: p.write_bytes(b"II*\0" + b"\xff" * 64), "", r"`bad.tif`: cannot be opened as a raster"),
        (lambda p: _write_geotiff(p, 16, 16), "1,x", r"GeoTIFF bands '1,x': expected 1-based band numbers"),
        (lambda p: _write_geotiff(p, 16, 16), "1,2", r"GeoTIFF bands selects 2; the model takes 3"),
    ],
    ids=["too-large", "unreadable", "bands-not-numbers", "too-few-bands"],
)
def test_a_bad_geotiff_gets_a_message_naming_the_file(
    app, monkeypatch, tiny_model_dir, tmp_path, make, bands, message
):
    monkeypatch.setenv("SIDEWALK_MODEL", str(tiny_model_dir))
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(app.gr.Error, match=message):
        app.segment(str(path), 0.5, 0.25, bands)


def test_a_geotiff_without_a_crs_gets_masks_and_says_why_there_are_no_centerlines(
    app, monkeypatch, tiny_model_dir, tmp_path
):
    monkeypatch.setenv("SIDEWALK_MODEL", str(tiny_model_dir))
    path = _write_geotiff(tmp_path / "plain.tif", 64, 64, georeferenced=False)
    _, _, centerlines, downloads, status = app.segment(
        str(path), 0.5, 0.25, "", progress=lambda *a, **k: None
    )
    assert [Path(p).name for p in downloads] == ["plain.mask.tif", "plain.prob.tif"]
    assert centerlines is None and "no centerlines: the GeoTIFF has no CRS" in status


def test_an_rgba_chip_is_predicted_on_its_colour_bands(app, monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setenv("SIDEWALK_MODEL", str(tiny_model_dir))
    rgb = Image.open(SPACE_DIR / "examples" / "chip_0.png").convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    rgb.save(tmp_path / "rgb.png")
    masks = [
        np.asarray(Image.open(app.segment(str(tmp_path / n), 0.5, 0.25)[3][0]))
        for n in ("rgb.png", "rgba.png")
    ]
    np.testing.assert_array_equal(masks[0], masks[1])


# ---- publishing ------------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for the Hub at huggingface_hub's network boundary and records what would be uploaded."""

    def __init__(self, monkeypatch):
        self.created, self.commits = [], []
        hub = self

        def create_repo(
            api, repo_id, *, repo_type=None, private=None, exist_ok=False, space_sdk=None, **kwargs
        ):
            hub.created.append(
                {"repo_id": repo_id, "repo_type": repo_type, "space_sdk": space_sdk, "private": private}
            )
            prefix = "spaces/" if repo_type == "space" else ""
            return RepoUrl(f"https://huggingface.co/{prefix}{repo_id}")

        def create_commit(
            api, repo_id, operations, *, commit_message, repo_type=None, revision=None, **kwargs
        ):
            files = {}
            for operation in operations:
                with operation.as_file() as handle:
                    files[operation.path_in_repo] = handle.read()
            hub.commits.append({"repo_id": repo_id, "repo_type": repo_type, "files": files})
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                commit_message=commit_message,
                commit_description="",
                oid="0" * 40,
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)

    def rebuild(self, commit: dict, destination: Path) -> Path:
        for name, content in commit["files"].items():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            (destination / name).write_bytes(content)
        return destination


@pytest.fixture
def fake_hub(monkeypatch):
    return FakeHub(monkeypatch)


def test_publish_space_uploads_the_app_its_examples_and_the_package(fake_hub):
    url = publish_space("org/sidewalk-demo", model_id="org/sidewalk-deeplab", private=True)
    assert url == "https://huggingface.co/spaces/org/sidewalk-demo"
    assert fake_hub.created == [
        {"repo_id": "org/sidewalk-demo", "repo_type": "space", "space_sdk": "gradio", "private": True}
    ]
    (commit,) = fake_hub.commits
    assert commit["repo_type"] == "space"
    files = commit["files"]
    assert {"app.py", "requirements.txt", "README.md", "examples/chip_0.png", "examples/scene.tif"} <= set(
        files
    )
    assert {"sidewalk_hf/__init__.py", "sidewalk_hf/space.py", "sidewalk_hf/templates/model_card.md"} <= set(
        files
    )
    assert "sidewalk_hf/metrics/sidewalk_iou/sidewalk_iou.py" in files
    assert not [name for name in files if "__pycache__" in name or name.endswith(".pyc")]
    assert files["app.py"] == (SPACE_DIR / "app.py").read_bytes()
    card = space_card_metadata(files["README.md"].decode())
    assert card["models"] == ["org/sidewalk-deeplab"] and card["sdk"] == "gradio"
    assert space_card_metadata((SPACE_DIR / "README.md").read_text())["models"] == []  # local card unchanged
    assert set(files) == set(space_files())


@pytest.mark.slow
def test_the_uploaded_space_runs_its_own_copy_of_the_package_and_shows_the_cards_model(fake_hub, tmp_path):
    pytest.importorskip("gradio", reason="the demo Space needs gradio: pip install -e '.[space]'")
    publish_space("org/sidewalk-demo", model_id="org/sidewalk-deeplab")
    uploaded = fake_hub.rebuild(fake_hub.commits[0], tmp_path / "space")
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "import sidewalk_hf, app\n"
        "print(sidewalk_hf.__file__); print(app.model_source())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SIDEWALK_MODEL"} | {
        "GRADIO_ANALYTICS_ENABLED": "False"
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=uploaded,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    package_file, model = result.stdout.strip().splitlines()[-2:]
    assert Path(package_file).resolve() == (uploaded / "sidewalk_hf" / "__init__.py").resolve()
    assert model == "org/sidewalk-deeplab"


def test_a_space_id_that_is_not_org_name_is_refused_before_any_upload(fake_hub):
    with pytest.raises(ValueError, match="space_id must be org/name"):
        publish_space("sidewalk-demo")
    with pytest.raises(ValueError, match="model_id must be a Hub model id"):
        publish_space("org/sidewalk-demo", model_id="runs/x/best")
    assert not fake_hub.created and not fake_hub.commits


def test_push_script_with_space_publishes_both_and_the_card_links_the_space(
    fake_hub, tiny_model_dir, tmp_path
):
    run_dir = tmp_path / "runs" / "20260101-000000-tiny"
    save_pretrained_with_processor(
        SidewalkDeepLabForSemanticSegmentation.from_pretrained(tiny_model_dir),
        SidewalkImageProcessor.from_pretrained(tiny_model_dir),
        run_dir / "final",
    )
    (run_dir / "config.yaml").write_text("DATASET:\n  SOURCE: org/aerial-sidewalks\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iter": 1, "loss": 1.0, "lr": 0.001}) + "\n")
    write_model_card(run_dir / "final", run_dir=run_dir, eval_results=RESULTS, iteration=1)
    assert "spaces/" not in (run_dir / "final" / "README.md").read_text()

    push = runpy.run_path(str(REPO / "scripts" / "push_to_hub.py"), run_name="push_to_hub")["main"]
    push([str(run_dir), "--repo-id", "org/sidewalk-deeplab", "--space", "org/sidewalk-demo"])
    model_commit, space_commit = fake_hub.commits
    assert (model_commit["repo_id"], space_commit["repo_id"]) == ("org/sidewalk-deeplab", "org/sidewalk-demo")
    assert space_commit["repo_type"] == "space"
    card = model_commit["files"]["README.md"].decode()
    assert "[org/sidewalk-demo](https://huggingface.co/spaces/org/sidewalk-demo)" in card
    assert space_card_metadata(space_commit["files"]["README.md"].decode())["models"] == [
        "org/sidewalk-deeplab"
    ]
