"""Datasets from geodata: generated orthophoto scenes with their true sidewalks, through make_dataset.

Every test builds from files the synthetic scene generator writes (a georeferenced GeoTIFF, its true mask,
its true centerlines), the centerlines rewritten as OpenStreetMap / OpenSidewalks lines with a ``width``.
"""

from __future__ import annotations

import io
import json
import runpy
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
pytest.importorskip("pyogrio")

from PIL import Image
from pyproj import Transformer
from rasterio.windows import Window

from sidewalk_hf.data.scene import write_scene
from sidewalk_hf.datasets_from_geodata import BuildOptions, build_dataset, pixel_rule_of_dataset

REPO = Path(__file__).resolve().parents[1]


def osm_lines(scene, path: Path, to_crs: str | None = None) -> Path:
    """The scene's true centerlines as OSM-style sidewalk lines (``width`` in metres, a string as in OSM)."""
    collection = json.loads(scene.centerlines.read_text())
    transformer = Transformer.from_crs(scene.crs, to_crs, always_xy=True) if to_crs else None
    for feature in collection["features"]:
        feature["properties"]["width"] = f"{feature['properties'].pop('width_m'):.4f}"
        if transformer is not None:
            xs, ys = zip(*feature["geometry"]["coordinates"])
            lon, lat = transformer.transform(xs, ys)
            feature["geometry"]["coordinates"] = [list(point) for point in zip(lon, lat)]
    if to_crs == "EPSG:4326":
        del collection["crs"]  # RFC 7946 GeoJSON: WGS84 longitude/latitude, no crs member
    path.write_text(json.dumps(collection))
    return path


def scene_region(scene, path: Path) -> Path:
    """The whole scene as the annotated region."""
    with rasterio.open(scene.image) as src:
        left, bottom, right, top = src.bounds
    ring = [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "crs": {"type": "name", "properties": {"name": scene.crs}},
                "features": [
                    {
                        "type": "Feature",
                        "properties": {},
                        "geometry": {"type": "Polygon", "coordinates": [ring]},
                    }
                ],
            }
        )
    )
    return path


def read_rows(dataset: Path, split: str | None = None) -> list[dict]:
    rows = []
    for path in sorted((dataset / "data").glob(f"{split or '*'}-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            row["split"] = path.name.split("-")[0]
            row["pixels"] = np.array(Image.open(io.BytesIO(row["image"]["bytes"])))
            row["labels"] = np.array(Image.open(io.BytesIO(row["mask"]["bytes"])))
            rows.append(row)
    return rows


def sidewalk_iou(a: np.ndarray, b: np.ndarray) -> float:
    valid = (a != 255) & (b != 255)
    return ((a == 1) & (b == 1) & valid).sum() / max(1, (((a == 1) | (b == 1)) & valid).sum())


def masks_and_truth(rows: list[dict], truth_path: Path) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(truth_path) as truth:
        pairs = [(row["labels"], truth.read(1, window=Window(*row["window"]))) for row in rows]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


@pytest.fixture(scope="module")
def utm_scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("utm")
    scene = write_scene(folder, "tile", height_px=448, width_px=512, seed=3, gsd_m=0.3, nodata_border_px=24)
    return (
        scene,
        osm_lines(scene, folder / "sidewalks.geojson"),
        scene_region(scene, folder / "region.geojson"),
    )


@pytest.fixture(scope="module")
def utm_dataset(utm_scene, tmp_path_factory):
    scene, lines, region = utm_scene
    out = tmp_path_factory.mktemp("built") / "dataset"
    report = build_dataset(
        BuildOptions(
            images=[str(scene.image)],
            labels=[str(lines)],
            out=str(out),
            chip_px=128,
            overlap_px=32,
            label_region=str(region),
            split_block_m=80,
            num_workers=0,
        )
    )
    return out, report


def test_chip_masks_equal_the_true_masks(utm_scene, utm_dataset):
    scene, _, _ = utm_scene
    out, report = utm_dataset
    rows = read_rows(out)
    assert len(rows) == sum(c["chips"] for c in report["splits"].values()) > 4
    masks, truth = masks_and_truth(rows, scene.truth_mask)
    assert set(np.unique(masks)) <= {0, 1, 255}
    assert sidewalk_iou(masks, truth) >= 0.95
    # nodata pixels (the scene's left border) are 255 in the masks and 0 in the images
    assert np.array_equal(masks == 255, truth == 255)
    nodata_rows = [r for r in rows if r["window"][0] == 0]
    assert nodata_rows and all(
        (r["pixels"][:, :24] == 0).all() and (r["labels"][:, :24] == 255).all() for r in nodata_rows
    )


def test_rows_carry_their_georeference(utm_scene, utm_dataset):
    scene, _, _ = utm_scene
    out, _ = utm_dataset
    with rasterio.open(scene.image) as src:
        for row in read_rows(out)[:5]:
            window = Window(*row["window"])
            assert row["crs"] == "EPSG:32618" and row["source"] == "tile.tif"
            assert row["transform"] == list(tuple(src.window_transform(window))[:6])
            assert row["gsd_m"] == pytest.approx(0.3)
            assert np.array_equal(row["pixels"].transpose(2, 0, 1), src.read(window=window))
    footprints = json.loads((out / "footprints" / "train.geojson").read_text())
    assert len(footprints["features"]) == report_count(out, "train")
    lon, lat = footprints["features"][0]["geometry"]["coordinates"][0][0]
    assert -75 < lon < -73 and 40 < lat < 41  # WGS84, where the scene lies (UTM 18N)


def report_count(out: Path, split: str) -> int:
    return json.loads((out / "build_report.json").read_text())["splits"][split]["chips"]


def test_card_and_layout_are_read_by_datasets_and_the_training_stream(utm_dataset):
    import datasets

    from sidewalk_hf.data.streaming import SegmentationStream

    out, report = utm_dataset
    card = (out / "README.md").read_text()
    metadata = __import__("yaml").safe_load(card.split("---")[1])
    assert metadata["task_categories"] == ["image-segmentation"] and metadata["size_categories"] == ["n<1K"]
    assert metadata["pixel_rule"] == {"bands": None, "scale": "none", "ranges": None}
    assert {s["name"]: s["num_examples"] for s in metadata["dataset_info"]["splits"]} == {
        name: c["chips"] for name, c in report["splits"].items() if c["chips"]
    }
    assert "all_touched=False" in card and "ODbL" in card and (out / "contact_sheet.png").is_file()
    assert pixel_rule_of_dataset(out) == metadata["pixel_rule"]
    first = next(iter(datasets.load_dataset(str(out), split="train", streaming=True)))
    assert first["image"].size == (128, 128) and first["mask"].mode in ("L", "P")
    stream = SegmentationStream(
        str(out),
        "train",
        per_process_batch_size=2,
        training=False,
        image_mean=[0.5] * 3,
        image_std=[0.25] * 3,
        rescale_factor=1 / 255,
        num_channels=3,
    )
    batch = next(iter(stream))
    assert batch["pixel_values"].shape[1:] == (3, 128, 128) and batch["labels"].shape[1:] == (128, 128)


def test_labels_in_wgs84_on_a_raster_in_us_feet_give_the_same_masks(tmp_path):
    scene = write_scene(tmp_path, "feet", height_px=384, width_px=384, seed=5, crs="EPSG:3424", gsd_m=0.3)
    region = scene_region(scene, tmp_path / "region.geojson")
    masks = {}
    for name, crs in (("native", None), ("wgs84", "EPSG:4326")):
        lines = osm_lines(scene, tmp_path / f"{name}.geojson", to_crs=crs)
        out = tmp_path / name
        build_dataset(
            BuildOptions(
                images=[str(scene.image)],
                labels=[str(lines)],
                out=str(out),
                chip_px=128,
                overlap_px=0,
                label_region=str(region),
                split=(1, 0, 0),
                num_workers=0,
            )
        )
        rows = sorted(read_rows(out), key=lambda r: r["window"])
        masks[name], truth = masks_and_truth(rows, scene.truth_mask)
    assert sidewalk_iou(masks["wgs84"], truth) >= 0.95
    assert sidewalk_iou(masks["native"], truth) >= 0.95
    assert (masks["wgs84"] != masks["native"]).mean() < 1e-3  # reprojection moves edges by far under a pixel


def test_split_blocks_never_share_a_place(tmp_path):
    """Two overlapping rasters of one place, small blocks: chips of different splits never overlap."""
    scene = write_scene(tmp_path, "wide", height_px=512, width_px=640, seed=8, gsd_m=0.3)
    lines = osm_lines(scene, tmp_path / "lines.geojson")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    with rasterio.open(scene.image) as src:
        for name, x0 in (("west", 0), ("east", 256)):  # 128 px (38 m) of overlap
            window = Window(x0, 0, 384, 512)
            profile = src.profile | {"width": 384, "height": 512, "transform": src.window_transform(window)}
            with rasterio.open(tiles / f"{name}.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
    out = tmp_path / "dataset"
    report = build_dataset(
        BuildOptions(
            images=[str(tiles)],
            labels=[str(lines)],
            out=str(out),
            chip_px=64,
            overlap_px=16,
            split=(0.5, 0.25, 0.25),
            split_block_m=40,
            seed=1,
            num_workers=0,
        )
    )
    rows = read_rows(out)
    by_split = {}
    for row in rows:
        a, _, c, _, e, f = row["transform"]
        w, h = row["window"][2:]
        by_split.setdefault(row["split"], []).append(shapely.box(c, f + e * h, c + a * w, f))
    assert len(by_split) == 3, {k: len(v) for k, v in by_split.items()}
    assert {s: len(b) for s, b in by_split.items()} == {s: c["chips"] for s, c in report["splits"].items()}
    assert report["skipped_chips"]["split_boundary"] > 0
    for split, boxes in by_split.items():
        others = shapely.STRtree([b for s, bs in by_split.items() if s != split for b in bs])
        for chip in boxes:
            for other in others.geometries.take(others.query(chip, predicate="intersects")):
                assert chip.intersection(other).area < 1e-6, (split, chip.bounds, other.bounds)
    # the overlap of the two rasters was cut from both, into the same split
    sources = {row["source"] for row in rows}
    assert sources == {"west.tif", "east.tif"}


def test_16_bit_4_band_raster_with_bands_and_scale_gives_the_8_bit_chips(tmp_path):
    rgb8 = write_scene(tmp_path, "rgb8", height_px=256, width_px=320, seed=11, gsd_m=0.3)
    nrgb16 = write_scene(
        tmp_path, "nrgb16", height_px=256, width_px=320, seed=11, gsd_m=0.3, num_bands=4, dtype="uint16"
    )
    lines = osm_lines(rgb8, tmp_path / "lines.geojson")
    built = {}
    for name, scene, bands, scale in (("8", rgb8, None, "none"), ("16", nrgb16, "2,3,4", "fixed:0,65535")):
        out = tmp_path / f"ds{name}"
        build_dataset(
            BuildOptions(
                images=[str(scene.image)],
                labels=[str(lines)],
                out=str(out),
                chip_px=128,
                overlap_px=32,
                bands=bands,
                scale=scale,
                split=(1, 0, 0),
                num_workers=0,
            )
        )
        built[name] = sorted(read_rows(out), key=lambda r: r["window"])
    assert len(built["8"]) == len(built["16"]) > 0
    for a, b in zip(built["8"], built["16"]):
        assert a["window"] == b["window"]
        assert np.array_equal(a["pixels"], b["pixels"]) and np.array_equal(a["labels"], b["labels"])
    assert pixel_rule_of_dataset(tmp_path / "ds16") == {
        "bands": [2, 3, 4],
        "scale": "fixed:0,65535",
        "ranges": [[0.0, 65535.0]],
    }


def make_dataset_main(argv: list[str]) -> int:
    return runpy.run_path(str(REPO / "scripts" / "make_dataset.py"), run_name="make_dataset")["main"](argv)


def test_bad_rasters_are_reported_and_the_build_goes_on(utm_scene, tmp_path, capsys):
    scene, lines, _ = utm_scene
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a GeoTIFF at all")
    no_crs = tmp_path / "no_crs.tif"
    with rasterio.open(scene.image) as src:
        profile = src.profile | {"crs": None}
        with rasterio.open(no_crs, "w", **profile) as dst:
            dst.write(src.read())
    far = write_scene(
        tmp_path, "far", height_px=128, width_px=128, seed=1, gsd_m=0.3, origin=(300_000.0, 5_000_000.0)
    )
    four_bands = write_scene(tmp_path, "four", height_px=128, width_px=128, seed=1, gsd_m=0.3, num_bands=4)
    out = tmp_path / "dataset"
    code = make_dataset_main(
        [
            "--images",
            str(scene.image),
            str(broken),
            str(no_crs),
            str(far.image),
            str(four_bands.image),
            "--labels",
            str(lines),
            "--out",
            str(out),
            "--chip-size",
            "128",
            "--overlap",
            "0",
            "--split",
            "1,0,0",
            "--num-workers",
            "0",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    report = json.loads((out / "build_report.json").read_text())
    bad = {Path(p).name: reason for p, reason in report["bad_rasters"].items()}
    assert set(bad) == {"broken.tif", "no_crs.tif", "far.tif", "four.tif"}
    assert "cannot be opened" in bad["broken.tif"] and "no CRS" in bad["no_crs.tif"]
    assert "no overlap" in bad["far.tif"] and "gives 4 bands" in bad["four.tif"]
    assert report["rasters_used"] == 1 and report["splits"]["train"]["chips"] > 0
    assert (
        "LEFT OUT" in captured.err
        and "broken.tif" in captured.err
        and "chips per split: train" in captured.out
    )
    assert "broken.tif" in (out / "README.md").read_text()


def test_lines_without_a_width_need_line_width_m(utm_scene, tmp_path, capsys):
    scene, _, _ = utm_scene
    collection = json.loads(scene.centerlines.read_text())
    for feature in collection["features"]:
        feature["properties"].pop("width_m")
    lines = tmp_path / "no_width.geojson"
    lines.write_text(json.dumps(collection))
    argv = [
        "--images",
        str(scene.image),
        "--labels",
        str(lines),
        "--out",
        str(tmp_path / "a"),
        "--num-workers",
        "0",
    ]
    assert make_dataset_main(argv) == 2
    assert "no usable 'width'" in capsys.readouterr().err and not (tmp_path / "a").exists()
    argv[5] = str(tmp_path / "b")
    assert (
        make_dataset_main(argv + ["--line-width-m", "1.5", "--chip-size", "128", "--split-block-m", "80"])
        == 0
    )


@pytest.mark.parametrize("driver, suffix", [("GPKG", ".gpkg"), ("ESRI Shapefile", ".shp")])
def test_sidewalk_polygons_from_a_geopackage_or_shapefile_are_used_as_they_are(
    utm_scene, tmp_path, driver, suffix
):
    import pyogrio.raw

    scene, _, region = utm_scene
    collection = json.loads(scene.centerlines.read_text())
    polygons = [
        shapely.geometry.shape(f["geometry"]).buffer(
            f["properties"]["width_m"] / 2, cap_style="square", join_style="mitre"
        )
        for f in collection["features"]
    ]
    polygons = shapely.get_parts(shapely.union_all(polygons))  # a city's sidewalk polygons: one per area
    to_wgs84 = Transformer.from_crs(scene.crs, "EPSG:4326", always_xy=True)
    polygons = shapely.transform(polygons, lambda xy: np.column_stack(to_wgs84.transform(xy[:, 0], xy[:, 1])))
    path = tmp_path / f"sidewalks{suffix}"
    pyogrio.raw.write(
        path,
        shapely.to_wkb(polygons),
        field_data=[np.arange(len(polygons))],
        fields=["fid_"],
        driver=driver,
        geometry_type="Polygon",
        crs="EPSG:4326",
    )
    out = tmp_path / "dataset"
    build_dataset(
        BuildOptions(
            images=[str(scene.image)],
            labels=[str(path)],
            out=str(out),
            chip_px=128,
            overlap_px=0,
            label_region=str(region),
            split=(1, 0, 0),
            num_workers=0,
        )
    )
    masks, truth = masks_and_truth(read_rows(out), scene.truth_mask)
    assert sidewalk_iou(masks, truth) >= 0.95
    assert "**unknown**" in (out / "README.md").read_text()  # not OSM-like: the label license is not guessed


def test_percentile_scaling_is_resolved_once_and_recorded(tmp_path):
    scene = write_scene(
        tmp_path, "nrgb16", height_px=256, width_px=256, seed=2, gsd_m=0.3, num_bands=4, dtype="uint16"
    )
    lines = osm_lines(scene, tmp_path / "lines.geojson")
    out = tmp_path / "dataset"
    report = build_dataset(
        BuildOptions(
            images=[str(scene.image)],
            labels=[str(lines)],
            out=str(out),
            chip_px=128,
            bands="1,3,4",
            scale="percentiles:2,98",
            split=(1, 0, 0),
            num_workers=0,
        )
    )
    rule = pixel_rule_of_dataset(out)
    assert rule["bands"] == [1, 3, 4] and rule["scale"] == "percentiles:2,98" and len(rule["ranges"]) == 3
    assert all(0 <= lo < hi <= 65535 for lo, hi in rule["ranges"]) and rule == report["pixel_rule"]
    pixels = np.stack([row["pixels"] for row in read_rows(out)])
    assert pixels.min() == 0 and pixels.max() == 255  # the tails beyond the percentiles are clipped


def test_split_by_raster_puts_each_raster_in_one_split(utm_scene, tmp_path):
    from sidewalk_hf.data.scene import split_into_tiles

    scene, lines, _ = utm_scene
    tiles = split_into_tiles(scene.image, 2, 2, tmp_path / "tiles")
    out = tmp_path / "dataset"
    build_dataset(
        BuildOptions(
            images=[str(t) for t in tiles],
            labels=[str(lines)],
            out=str(out),
            chip_px=64,
            split_by="raster",
            split=(0.5, 0.5, 0),
            num_workers=0,
        )
    )
    split_of = {}
    for row in read_rows(out):
        split_of.setdefault(row["source"], set()).add(row["split"])
    assert len(split_of) == 4 and all(len(splits) == 1 for splits in split_of.values())
    assert set().union(*split_of.values()) == {"train", "validation"}  # one scene, yet two splits


def test_an_existing_folder_is_only_replaced_when_it_holds_a_dataset(utm_scene, tmp_path):
    from sidewalk_hf.datasets_from_geodata import BuildError

    scene, lines, _ = utm_scene
    out = tmp_path / "dataset"
    settings = {
        "images": [str(scene.image)],
        "labels": [str(lines)],
        "out": str(out),
        "chip_px": 128,
        "split": (1, 0, 0),
        "num_workers": 0,
    }
    build_dataset(BuildOptions(**settings))
    with pytest.raises(BuildError, match="already holds a finished dataset"):
        build_dataset(BuildOptions(**settings))
    build_dataset(BuildOptions(**settings), overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not removing it"):
        build_dataset(BuildOptions(**settings), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").is_file()


def test_a_dataset_build_config_section_with_opts_drives_the_cli(utm_scene, tmp_path):
    scene, lines, region = utm_scene
    out = tmp_path / "dataset"
    config = tmp_path / "build.yaml"
    config.write_text(
        "DATASET_BUILD:\n"
        f"  IMAGES: [{scene.image}]\n"
        f"  LABELS: [{lines}]\n"
        f"  LABEL_REGION: {region}\n"
        "  LABELS_WHERE: \"footway = 'sidewalk'\"\n"
        "  CHIP_SIZE_PX: 128\n"
        "  SPLIT: [1.0, 0.0, 0.0]\n"
        "  NUM_WORKERS: 0\n"
        "  LICENSE: odbl\n"
    )
    code = make_dataset_main(
        ["--config", str(config), "--out", str(out), "--opts", "DATASET_BUILD.OVERLAP_PX", "0"]
    )
    assert code == 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["options"]["chip_px"] == 128 and report["options"]["overlap_px"] == 0
    assert report["options"]["labels_where"] == "footway = 'sidewalk'" and report["label_license"] == "odbl"
    assert {tuple(row["window"][2:]) for row in read_rows(out)} == {(128, 128)}
