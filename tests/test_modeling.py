"""The model: Detectron2's structure, any input size, loss, initialisation, SyncBatchNorm conversion."""

import pytest
import timm
import torch
from torch import nn

from sidewalk_hf import (
    ASPP,
    SidewalkDeepLabConfig,
    SidewalkDeepLabForSemanticSegmentation,
    WeightedDeepLabHead,
    convert_batchnorm_to_sync,
)
from sidewalk_hf.modeling_sidewalk_deeplab import AtrousConv2d, create_backbone

DETECTRON2_R103_DEEPLABV3PLUS_PARAMETERS = 59_467_315  # 19 classes, learnable parameters
DETECTRON2_R103_BACKBONE_PARAMETERS = 42_623_936

TINY = {
    "backbone": "test_resnet",
    "res5_multi_grid": [1],
    "aspp_channels": 16,
    "project_channels": 8,
    "decoder_channels": 16,
}


def tiny_model(**overrides) -> SidewalkDeepLabForSemanticSegmentation:
    torch.manual_seed(0)
    return SidewalkDeepLabForSemanticSegmentation(SidewalkDeepLabConfig(**{**TINY, **overrides}))


@pytest.fixture(scope="module")
def r101_on_meta():
    with torch.device("meta"):
        return SidewalkDeepLabForSemanticSegmentation(
            SidewalkDeepLabConfig(num_labels=19, class_weights=None)
        )


def test_default_r101_has_detectron2_res5_dilations(r101_on_meta):
    res5 = r101_on_meta.backbone.layer4
    assert [block.conv2.dilation for block in res5] == [(2, 2), (4, 4), (8, 8)]
    assert [block.conv2.padding for block in res5] == [(2, 2), (4, 4), (8, 8)]
    assert [block.conv2.stride for block in res5] == [(1, 1)] * 3
    assert res5[0].downsample[0].stride == (1, 1)


def test_default_r101_features_are_res2_and_res5(r101_on_meta):
    assert r101_on_meta.backbone.feature_info.reduction() == [4, 16]
    assert r101_on_meta.backbone.feature_info.channels() == [256, 2048]
    assert r101_on_meta.backbone.feature_info.module_name() == ["layer1", "layer4"]


def test_default_r101_logits_have_the_input_size(r101_on_meta):
    logits = r101_on_meta(torch.empty(2, 3, 96, 160, device="meta")).logits
    assert logits.shape == (2, 19, 96, 160)


def test_default_r101_parameter_count_equals_detectron2s(r101_on_meta):
    total = sum(parameter.numel() for parameter in r101_on_meta.parameters())
    backbone = sum(parameter.numel() for parameter in r101_on_meta.backbone.parameters())
    print(f"R-101 DeepLabV3+ with 19 classes: {total:,} parameters ({backbone:,} in the backbone)")
    assert backbone == DETECTRON2_R103_BACKBONE_PARAMETERS
    assert total == DETECTRON2_R103_DEEPLABV3PLUS_PARAMETERS


def test_default_r101_forward_on_cpu_keeps_the_input_size():
    torch.manual_seed(0)
    model = SidewalkDeepLabForSemanticSegmentation(SidewalkDeepLabConfig()).eval()
    print(f"R-101 DeepLabV3+ with 2 classes: {model.num_parameters():,} parameters")
    with torch.inference_mode():
        logits = model(torch.randn(1, 3, 64, 64)).logits
    assert logits.shape == (1, 2, 64, 64)
    assert torch.isfinite(logits).all()


def test_head_is_a_deeplabv3plus_decoder(r101_on_meta):
    head = r101_on_meta.decode_head
    assert isinstance(head, WeightedDeepLabHead) and isinstance(head.aspp, ASPP)
    assert [branch.conv.dilation for branch in head.aspp.branches] == [(1, 1), (6, 6), (12, 12), (18, 18)]
    assert head.aspp.image_pooling_conv.bias is not None  # conv with bias and no norm, as in Detectron2
    assert head.aspp.project.conv.in_channels == 5 * 256
    assert head.low_level_projection.conv.out_channels == 48
    assert head.fuse[0].conv.in_channels == 48 + 256
    assert head.aspp.dropout.p == 0.1


@pytest.mark.parametrize("size", [(64, 64), (50, 70), (33, 129)])
def test_logits_match_any_input_size(size):
    model = tiny_model().eval()
    logits = model(torch.randn(2, 3, *size)).logits
    assert logits.shape == (2, 2, *size)


def test_labels_give_a_loss_with_finite_gradients():
    model = tiny_model().train()
    labels = torch.randint(0, 2, (2, 64, 64))
    labels[:, :8] = 255
    output = model(torch.randn(2, 3, 64, 64), labels=labels)
    output.loss.backward()
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.decode_head.aspp.image_pooling_conv.weight.grad is not None


def test_a_batch_of_one_trains():
    model = tiny_model().train()
    output = model(torch.randn(1, 3, 64, 64), labels=torch.randint(0, 2, (1, 64, 64)))
    output.loss.backward()
    assert torch.isfinite(output.loss)


def test_loss_uses_the_configured_class_weights_and_top_k():
    model = tiny_model(class_weights=[1.0, 3.0], top_k_percent_pixels=0.5).eval()
    pixel_values, labels = torch.randn(1, 3, 32, 32), torch.randint(0, 2, (1, 32, 32))
    output = model(pixel_values, labels=labels)
    pixel_losses = nn.functional.cross_entropy(
        output.logits, labels, weight=torch.tensor([1.0, 3.0]), ignore_index=255, reduction="none"
    )
    expected = pixel_losses.flatten().topk(pixel_losses.numel() // 2).values.mean()
    torch.testing.assert_close(output.loss, expected)


def test_tuple_output_and_hidden_states():
    model = tiny_model().eval()
    pixel_values, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 2, (1, 64, 64))
    output = model(pixel_values, labels=labels, output_hidden_states=True)
    low_level, high_level = output.hidden_states
    assert low_level.shape[-2:] == (16, 16) and high_level.shape[-2:] == (4, 4)
    loss, logits, hidden_states = model(
        pixel_values, labels=labels, output_hidden_states=True, return_dict=False
    )
    torch.testing.assert_close(loss, output.loss)
    torch.testing.assert_close(logits, output.logits)
    assert len(hidden_states) == 2
    assert model(pixel_values, return_dict=False)[0].shape == (1, 2, 64, 64)


def test_post_init_leaves_timms_backbone_initialisation_alone():
    config = SidewalkDeepLabConfig(**TINY)
    torch.manual_seed(0)
    model = SidewalkDeepLabForSemanticSegmentation(config)
    torch.manual_seed(0)
    backbone = create_backbone(config)
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name


def test_head_is_initialised_as_detectron2():
    torch.manual_seed(0)
    head = SidewalkDeepLabForSemanticSegmentation(
        SidewalkDeepLabConfig(backbone="test_resnet", res5_multi_grid=[1])
    )
    head = head.decode_head
    assert head.classifier.weight.std().item() == pytest.approx(0.001, rel=0.2)
    assert torch.all(head.classifier.bias == 0)
    fuse_conv = head.fuse[0].conv.weight
    bound = (3.0 / fuse_conv[0].numel()) ** 0.5  # c2_xavier_fill: kaiming_uniform(a=1)
    assert fuse_conv.abs().max().item() <= bound and fuse_conv.abs().max().item() > 0.9 * bound
    assert torch.all(head.aspp.image_pooling_conv.bias == 0)
    assert torch.all(head.fuse[0].norm.weight == 1) and torch.all(head.fuse[0].norm.bias == 0)


def test_multi_grid_needs_one_entry_per_last_stage_block():
    with pytest.raises(ValueError, match=r"res5_multi_grid=\[1, 2, 4\] has 3 entries .* 2 blocks"):
        SidewalkDeepLabForSemanticSegmentation(SidewalkDeepLabConfig(backbone="resnet18", aspp_channels=16))


@pytest.mark.parametrize(("output_stride", "dilations"), [(8, [4, 8]), (16, [2, 4]), (32, [1, 2])])
def test_multi_grid_scales_with_the_output_stride(output_stride, dilations):
    with torch.device("meta"):
        config = SidewalkDeepLabConfig(
            backbone="resnet18", output_stride=output_stride, res5_multi_grid=[1, 2]
        )
        model = SidewalkDeepLabForSemanticSegmentation(config)
    assert [block.conv2.dilation[0] for block in model.backbone.layer4] == dilations
    assert model.backbone.feature_info.reduction()[-1] == output_stride


def test_backbones_without_resnet_blocks_keep_timms_dilations():
    torch.manual_seed(0)
    model = SidewalkDeepLabForSemanticSegmentation(
        SidewalkDeepLabConfig(backbone="mobilenetv3_small_050", aspp_channels=16, decoder_channels=16)
    ).eval()
    assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 2, 64, 64)


def test_four_band_input():
    model = tiny_model(num_channels=4, image_mean=[100.0] * 4, image_std=[50.0] * 4).eval()
    assert model.backbone.conv1[0].in_channels == 4
    assert model(torch.randn(1, 4, 32, 32)).logits.shape == (1, 2, 32, 32)


def test_sync_batchnorm_conversion_keeps_the_state_dict(tmp_path):
    model = tiny_model()
    keys = list(model.state_dict())
    converted = convert_batchnorm_to_sync(model)
    assert converted is model
    assert not any(type(module) is nn.BatchNorm2d for module in model.modules())
    assert any(isinstance(module, nn.SyncBatchNorm) for module in model.modules())
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    reloaded = SidewalkDeepLabForSemanticSegmentation.from_pretrained(tmp_path)
    assert any(type(module) is nn.BatchNorm2d for module in reloaded.modules())


def test_sync_batchnorm_conversion_keeps_timm_norm_activation_layers():
    backbone = timm.create_model("mobilenetv3_small_050", features_only=True)
    activations_before = [
        type(m.act) for m in backbone.modules() if isinstance(m, timm.layers.BatchNormAct2d)
    ]
    convert_batchnorm_to_sync(backbone)
    synced = [m for m in backbone.modules() if isinstance(m, timm.layers.norm_act.SyncBatchNormAct)]
    assert [type(m.act) for m in synced] == activations_before


@pytest.mark.parametrize(
    ("size", "dilation", "path"),
    [
        ((16, 16), 18, "centre tap"),  # rate 18 on a 256-px chip at stride 16
        ((16, 16), 12, "sparse weight gradient"),
        ((20, 20), 18, "sparse weight gradient"),
        ((12, 30), 12, "sparse weight gradient"),
        ((16, 16), 6, "dense"),
        ((64, 64), 18, "dense"),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_atrous_convolution_equals_the_dense_one(size, dilation, path, channels_last):
    conv = AtrousConv2d(8, 4, 3, padding=dilation, dilation=dilation, bias=False).double()
    fraction = conv.live_tap_fraction(*size)
    expected_path = (
        "centre tap" if dilation >= max(size) else "sparse weight gradient" if fraction < 0.5 else "dense"
    )
    assert expected_path == path
    torch.manual_seed(0)
    inputs = torch.randn(2, 8, *size, dtype=torch.float64)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    inputs.requires_grad_()
    grad_output = torch.randn(2, 4, *size, dtype=torch.float64)

    outputs = conv(inputs)
    ran_sparse_gradient = "PaddingSkipping" in type(outputs.grad_fn).__name__
    assert ran_sparse_gradient == (path == "sparse weight gradient")
    outputs.backward(grad_output)
    reference_inputs = inputs.detach().clone().requires_grad_()
    reference_weight = conv.weight.detach().clone().requires_grad_()
    reference = torch.nn.functional.conv2d(
        reference_inputs, reference_weight, padding=dilation, dilation=dilation
    )
    reference.backward(grad_output)

    torch.testing.assert_close(outputs, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(inputs.grad, reference_inputs.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, reference_weight.grad, rtol=0, atol=1e-12)


def test_aspp_rates_use_atrous_convolutions_with_unchanged_parameter_names(r101_on_meta):
    branches = r101_on_meta.decode_head.aspp.branches
    assert [type(branch.conv) for branch in branches] == [nn.Conv2d] + [AtrousConv2d] * 3
    assert branches[3].conv.weight.shape == (256, 2048, 3, 3)
    assert "decode_head.aspp.branches.3.conv.weight" in r101_on_meta.state_dict()


def test_atrous_convolution_refuses_settings_it_does_not_reproduce():
    with pytest.raises(ValueError, match="AtrousConv2d needs stride 1"):
        AtrousConv2d(8, 4, 3, padding=1, dilation=2)


def test_atrous_convolution_under_bf16_autocast_matches_autocasts_own_convolution():
    torch.manual_seed(0)
    conv = AtrousConv2d(32, 16, 3, padding=12, dilation=12, bias=False)
    assert conv.live_tap_fraction(16, 16) < 0.5  # the sparse weight gradient path
    inputs = torch.randn(2, 32, 16, 16, requires_grad=True)
    grad_output = torch.randn(2, 16, 16, 16)
    results = []
    for skip_padding in (True, False):
        conv.skip_padding, conv.weight.grad, inputs.grad = skip_padding, None, None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = conv(inputs)
        assert ("PaddingSkipping" in type(outputs.grad_fn).__name__) == skip_padding
        outputs.backward(grad_output.to(outputs.dtype))
        results.append((outputs.detach(), inputs.grad.clone(), conv.weight.grad.clone()))
    (outputs, grad_inputs, grad_weight), (ref_outputs, ref_grad_inputs, ref_grad_weight) = results
    assert outputs.dtype == ref_outputs.dtype == torch.bfloat16
    assert grad_weight.dtype == torch.float32 and grad_inputs.dtype == torch.float32
    torch.testing.assert_close(outputs, ref_outputs, rtol=0, atol=0)
    torch.testing.assert_close(grad_inputs, ref_grad_inputs, rtol=0, atol=0)
    torch.testing.assert_close(
        grad_weight, ref_grad_weight, rtol=2e-2, atol=1e-2 * ref_grad_weight.abs().max().item()
    )
