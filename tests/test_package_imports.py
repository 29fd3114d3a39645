"""What importing the package costs: the vector stage without torch and transformers, the model registered
with transformers' Auto classes whatever path imports it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from sidewalk_hf.data.scene import split_into_tiles, write_scene

REPO = Path(__file__).resolve().parents[1]

VECTOR_STAGE_CHECK = textwrap.dedent(
    """
    import importlib.util, json, sys
    import sidewalk_hf, sidewalk_hf.geo, sidewalk_hf.network, sidewalk_hf.network.scoring

    def script(name):
        spec = importlib.util.spec_from_file_location(name, sys.argv[1] + f"/scripts/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    imported = {"score_network": script("score_network")}
    code = script("vectorize").main([*sys.argv[3:], "--out", sys.argv[2]])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "timm"))
    print(json.dumps({"code": code, "heavy": heavy, "dir": dir(sidewalk_hf), "all": sidewalk_hf.__all__}))
    """
)

MODEL_IMPORT_CHECK = textwrap.dedent(
    """
    import json, sys
    from sidewalk_hf.modeling_sidewalk_deeplab import SidewalkDeepLabForSemanticSegmentation  # as training does
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation

    import sidewalk_hf

    folder = sys.argv[1]
    config = AutoConfig.for_model("sidewalk-deeplab", **json.loads(sys.argv[2]))
    model = SidewalkDeepLabForSemanticSegmentation(config)
    model.save_pretrained(folder)
    sidewalk_hf.SidewalkImageProcessor.from_model_config(config).save_pretrained(folder)
    print(json.dumps({
        "config": type(config).__module__,
        "auto_model": type(AutoModel.from_pretrained(folder)).__module__,
        "auto_segmentation": type(AutoModelForSemanticSegmentation.from_pretrained(folder)).__module__,
        "auto_processor": type(AutoImageProcessor.from_pretrained(folder)).__module__,
        "auto_map": json.load(open(folder + "/config.json"))["auto_map"],
    }))
    """
)


def _run(script: str, *args: str, cwd: Path) -> dict:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=environment | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_the_vector_stage_imports_neither_torch_nor_transformers(tmp_path):
    scene = write_scene(tmp_path, "scene", height_px=160, width_px=200, seed=1)
    tiles = split_into_tiles(scene.truth_mask, 1, 2, tmp_path / "tiles")  # a run: VRT mosaic and merge
    result = _run(VECTOR_STAGE_CHECK, str(REPO), str(tmp_path / "out"), *map(str, tiles), cwd=tmp_path)
    assert result["code"] == 0 and (tmp_path / "out" / "run.centerlines.geojson").exists()
    assert result["heavy"] == []
    assert set(result["all"]) <= set(result["dir"])  # the lazy names are listed before they are imported


def test_importing_a_model_module_registers_the_model_with_the_auto_classes(tmp_path):
    tiny = {"backbone": "test_resnet", "res5_multi_grid": [1], "aspp_channels": 16, "project_channels": 8}
    result = _run(MODEL_IMPORT_CHECK, str(tmp_path / "model"), json.dumps(tiny), cwd=tmp_path)
    assert result["config"] == "sidewalk_hf.configuration_sidewalk_deeplab"
    assert result["auto_model"] == result["auto_segmentation"] == "sidewalk_hf.modeling_sidewalk_deeplab"
    assert result["auto_processor"] == "sidewalk_hf.image_processing_sidewalk_deeplab"
    model_class = "modeling_sidewalk_deeplab.SidewalkDeepLabForSemanticSegmentation"
    assert result["auto_map"] == {
        "AutoConfig": "configuration_sidewalk_deeplab.SidewalkDeepLabConfig",
        "AutoModel": model_class,
        "AutoModelForSemanticSegmentation": model_class,
    }
    assert (tmp_path / "model" / "modeling_sidewalk_deeplab.py").exists()
