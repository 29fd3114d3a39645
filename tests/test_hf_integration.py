"""transformers integration: save/load, Auto classes, remote code in a fresh process, processor, pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
    pipeline,
)

from sidewalk_hf import (
    SidewalkDeepLabConfig,
    SidewalkDeepLabForSemanticSegmentation,
    SidewalkImageProcessor,
    save_pretrained_with_processor,
)

TINY = {
    "backbone": "test_resnet",
    "res5_multi_grid": [1],
    "aspp_channels": 16,
    "project_channels": 8,
    "decoder_channels": 16,
}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = SidewalkDeepLabForSemanticSegmentation(SidewalkDeepLabConfig(**TINY)).eval()
    with torch.no_grad():  # large enough logits for both classes to show up in predictions
        model.decode_head.classifier.weight.mul_(3000.0)
    return model


@pytest.fixture(scope="module")
def saved_dir(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_sidewalk_deeplab")
    save_pretrained_with_processor(
        tiny_model, SidewalkImageProcessor.from_model_config(tiny_model.config), directory
    )
    return directory


@pytest.fixture(scope="module")
def chip():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (72, 88, 3), dtype=np.uint8))


def test_saved_folder_holds_weights_processor_code_and_auto_map(saved_dir):
    files = set(os.listdir(saved_dir))
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "configuration_sidewalk_deeplab.py",
        "modeling_sidewalk_deeplab.py",
        "image_processing_sidewalk_deeplab.py",
    } <= files
    auto_map = json.loads((saved_dir / "config.json").read_text())["auto_map"]
    model_class = "modeling_sidewalk_deeplab.SidewalkDeepLabForSemanticSegmentation"
    assert auto_map == {
        "AutoConfig": "configuration_sidewalk_deeplab.SidewalkDeepLabConfig",
        "AutoModel": model_class,
        "AutoModelForSemanticSegmentation": model_class,
    }
    processor_config = json.loads((saved_dir / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"] == {
        "AutoImageProcessor": "image_processing_sidewalk_deeplab.SidewalkImageProcessor"
    }


def test_saved_model_code_uses_relative_imports_only(saved_dir):
    for name in ("configuration_sidewalk_deeplab.py", "modeling_sidewalk_deeplab.py"):
        assert "sidewalk_hf" not in (saved_dir / name).read_text()


def test_save_load_round_trip_gives_identical_logits(tiny_model, saved_dir):
    reloaded = SidewalkDeepLabForSemanticSegmentation.from_pretrained(saved_dir).eval()
    pixel_values = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        assert torch.equal(reloaded(pixel_values).logits, tiny_model(pixel_values).logits)


def test_auto_classes_resolve_to_the_sidewalk_classes(saved_dir):
    assert isinstance(AutoConfig.from_pretrained(saved_dir), SidewalkDeepLabConfig)
    assert isinstance(AutoModel.from_pretrained(saved_dir), SidewalkDeepLabForSemanticSegmentation)
    assert isinstance(
        AutoModelForSemanticSegmentation.from_pretrained(saved_dir), SidewalkDeepLabForSemanticSegmentation
    )
    assert isinstance(AutoImageProcessor.from_pretrained(saved_dir), SidewalkImageProcessor)


def test_class_weights_survive_from_pretrained(saved_dir):
    reloaded = SidewalkDeepLabForSemanticSegmentation.from_pretrained(saved_dir).eval()
    pixel_values, labels = torch.randn(1, 3, 32, 32), torch.randint(0, 2, (1, 32, 32))
    output = reloaded(pixel_values, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        output.logits, labels, weight=torch.tensor([1.0, 10.0]), reduction="sum"
    )
    torch.testing.assert_close(output.loss, expected / labels.numel())


def test_loading_with_another_class_count_reinitialises_only_the_classifier(tiny_model, saved_dir):
    three_classes = {0: "background", 1: "sidewalk", 2: "crossing"}
    model = SidewalkDeepLabForSemanticSegmentation.from_pretrained(
        saved_dir,
        id2label=three_classes,
        label2id={name: index for index, name in three_classes.items()},
        class_weights=None,
        ignore_mismatched_sizes=True,
    )
    classifier = model.decode_head.classifier
    assert classifier.weight.shape == (3, 16, 1, 1)
    assert classifier.weight.std().item() == pytest.approx(0.001, rel=0.5) and torch.all(classifier.bias == 0)
    loaded, original = model.state_dict(), tiny_model.state_dict()
    for name in original:
        if not name.startswith("decode_head.classifier."):
            assert torch.equal(loaded[name], original[name]), name


def test_loading_with_another_class_count_needs_matching_class_weights(saved_dir):
    with pytest.raises(
        ValueError, match=r"class_weights=\[1.0, 10.0\] has 2 entries but the model predicts 3"
    ):
        SidewalkDeepLabForSemanticSegmentation.from_pretrained(
            saved_dir, id2label={0: "a", 1: "b", 2: "c"}, ignore_mismatched_sizes=True
        )


def test_processor_normalises_with_the_model_configs_mean_and_std(chip):
    config = SidewalkDeepLabConfig(image_mean=[100.0, 110.0, 120.0], image_std=[50.0, 55.0, 60.0])
    processor = SidewalkImageProcessor.from_model_config(config)
    assert processor.do_resize is False and processor.do_reduce_labels is False
    assert processor.rescale_factor == pytest.approx(1 / 255)
    assert processor.image_mean == pytest.approx([100 / 255, 110 / 255, 120 / 255])
    assert processor.image_std == pytest.approx([50 / 255, 55 / 255, 60 / 255])
    pixel_values = processor(chip, return_tensors="pt")["pixel_values"]
    image = torch.from_numpy(np.array(chip)).permute(2, 0, 1).float()
    expected = (image - torch.tensor(config.image_mean)[:, None, None]) / torch.tensor(config.image_std)[
        :, None, None
    ]
    assert pixel_values.shape == (1, 3, 72, 88)
    torch.testing.assert_close(pixel_values[0], expected, rtol=1e-5, atol=1e-4)


def test_processor_keeps_mask_values(chip):
    processor = SidewalkImageProcessor.from_model_config(SidewalkDeepLabConfig())
    mask = Image.fromarray(np.array([[0, 1], [255, 1]], dtype=np.uint8).repeat(36, 0).repeat(44, 1))
    labels = processor(chip, segmentation_maps=mask, return_tensors="pt")["labels"]
    assert torch.equal(labels[0], torch.from_numpy(np.array(mask)).long())


def test_pipeline_returns_one_mask_per_class_present(saved_dir, tiny_model, chip):
    segmenter = pipeline("image-segmentation", model=str(saved_dir))
    results = segmenter(chip)
    processor = SidewalkImageProcessor.from_model_config(tiny_model.config)
    with torch.inference_mode():
        logits = tiny_model(**processor(chip, return_tensors="pt")).logits
    prediction = logits[0].argmax(0).numpy()
    assert {result["label"] for result in results} == {"background", "sidewalk"}
    for result in results:
        class_id = tiny_model.config.label2id[result["label"]]
        assert result["mask"].size == chip.size and result["mask"].mode == "L"
        np.testing.assert_array_equal(np.asarray(result["mask"]) == 255, prediction == class_id)


FRESH_PROCESS_CHECK = textwrap.dedent(
    """
    import json, sys
    sys.modules["sidewalk_hf"] = None  # the package is installed in this environment: make it unimportable
    try:
        import sidewalk_hf
        importable = True
    except ImportError:
        importable = False
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForSemanticSegmentation, pipeline

    folder, inputs_path = sys.argv[1], sys.argv[2]
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    inputs = torch.load(inputs_path)
    with torch.inference_mode():
        same_logits = torch.equal(model(inputs["pixel_values"]).logits, inputs["logits"])
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    chip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    labels = sorted(result["label"] for result in segmenter(chip))
    print(json.dumps({
        "sidewalk_hf_importable": importable,
        "model_module": type(model).__module__,
        "base_class": type(base).__name__,
        "same_logits": same_logits,
        "pipeline_labels": labels,
    }))
    """
)


def test_fresh_process_without_the_package_loads_with_trust_remote_code(saved_dir, tiny_model, tmp_path):
    pixel_values = torch.randn(1, 3, 48, 64)
    with torch.inference_mode():
        torch.save(
            {"pixel_values": pixel_values, "logits": tiny_model(pixel_values).logits}, tmp_path / "inputs.pt"
        )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_CHECK, str(saved_dir), str(tmp_path / "inputs.pt")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["sidewalk_hf_importable"] is False
    assert result["model_module"].startswith("transformers_modules.")
    assert result["base_class"] == "SidewalkDeepLabForSemanticSegmentation"
    assert result["same_logits"] is True
    assert set(result["pipeline_labels"]) <= {"background", "sidewalk"} and result["pipeline_labels"]


@pytest.fixture()
def model_with_trained_norms(saved_dir):
    """The saved tiny model with batch-norm statistics and affine parameters that are far from the identity."""
    model = AutoModelForSemanticSegmentation.from_pretrained(saved_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in (
                    (module.running_mean, -0.5, 0.5),
                    (module.running_var, 0.3, 3.0),
                    (module.weight, 0.5, 1.5),
                    (module.bias, -0.5, 0.5),
                ):
                    tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))
    return model.eval()


def test_optimize_for_inference_folds_every_batch_norm_and_keeps_the_predictions(
    model_with_trained_norms, saved_dir, chip
):
    processor = AutoImageProcessor.from_pretrained(saved_dir)
    pixel_values = processor(chip, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        reference = model_with_trained_norms(pixel_values=pixel_values).logits
    norms_before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model_with_trained_norms.modules())

    optimized = model_with_trained_norms.optimize_for_inference()
    assert norms_before > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in optimized.modules())
    assert optimized.decode_head.classifier.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = optimized(pixel_values=pixel_values).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    assert torch.equal(logits.argmax(1), reference.argmax(1))

    segmenter = pipeline("image-segmentation", model=optimized, image_processor=processor)
    masks = {result["label"]: np.asarray(result["mask"]) == 255 for result in segmenter(chip)}
    assert masks
    for label, mask in masks.items():
        np.testing.assert_array_equal(
            mask, reference[0].argmax(0).numpy() == optimized.config.label2id[label]
        )


def test_a_model_optimized_for_inference_refuses_to_train_or_save(model_with_trained_norms, tmp_path):
    optimized = model_with_trained_norms.optimize_for_inference(channels_last=False)
    with pytest.raises(RuntimeError, match="cannot train"):
        optimized.train()
    with pytest.raises(RuntimeError, match="save it before optimizing"):
        optimized.save_pretrained(tmp_path / "folded")
    assert not (tmp_path / "folded").exists()
