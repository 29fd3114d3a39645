"""Hard pixel mining cross-entropy: Detectron2's DeepLabCE normalisation, against hand-computed values."""

import math

import pytest
import torch

from sidewalk_hf import hard_pixel_mining_cross_entropy

IGNORE = 255
# Four pixels of one 1x4 image, two classes. Cross-entropy of logits (a, b) is log(1 + exp(b - a)) for class 0
# and log(1 + exp(a - b)) for class 1.
LOGITS = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 3.0, 1.0]]).reshape(1, 2, 1, 4)
LABELS = torch.tensor([0, 1, IGNORE, IGNORE]).reshape(1, 1, 4)
LOSS_PIXEL_0 = math.log(2.0)  # logits (0, 0), class 0
LOSS_PIXEL_1 = math.log(1.0 + math.exp(2.0))  # logits (2, 0), class 1


def test_top_k_one_divides_by_all_pixels_including_ignored_ones():
    loss = hard_pixel_mining_cross_entropy(LOGITS, LABELS, ignore_index=IGNORE, top_k_percent_pixels=1.0)
    assert loss.item() == pytest.approx((LOSS_PIXEL_0 + LOSS_PIXEL_1) / 4)


def test_class_weights_scale_pixel_losses_but_not_the_denominator():
    weights = torch.tensor([1.0, 10.0])
    loss = hard_pixel_mining_cross_entropy(
        LOGITS, LABELS, weights, ignore_index=IGNORE, top_k_percent_pixels=1.0
    )
    assert loss.item() == pytest.approx((1.0 * LOSS_PIXEL_0 + 10.0 * LOSS_PIXEL_1) / 4)


def test_top_k_averages_the_k_largest_pixel_losses():
    loss = hard_pixel_mining_cross_entropy(LOGITS, LABELS, ignore_index=IGNORE, top_k_percent_pixels=0.25)
    assert loss.item() == pytest.approx(LOSS_PIXEL_1)  # k = int(0.25 * 4) = 1


def test_top_k_beyond_the_valid_pixels_averages_in_ignored_zeros():
    loss = hard_pixel_mining_cross_entropy(LOGITS, LABELS, ignore_index=IGNORE, top_k_percent_pixels=0.75)
    assert loss.item() == pytest.approx((LOSS_PIXEL_0 + LOSS_PIXEL_1 + 0.0) / 3)  # k = 3


def test_top_k_with_class_weights_ranks_weighted_losses():
    weights = torch.tensor([10.0, 1.0])  # pixel 0 now outweighs pixel 1: 10 * 0.69 > 2.13
    loss = hard_pixel_mining_cross_entropy(
        LOGITS, LABELS, weights, ignore_index=IGNORE, top_k_percent_pixels=0.25
    )
    assert loss.item() == pytest.approx(10.0 * LOSS_PIXEL_0)


def test_top_k_is_taken_over_the_whole_batch_not_per_image():
    easy = torch.tensor([5.0, 0.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    hard = torch.tensor([0.0, 5.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    logits = torch.cat([easy, hard])
    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    loss = hard_pixel_mining_cross_entropy(logits, labels, top_k_percent_pixels=0.5)
    assert loss.item() == pytest.approx(
        math.log(1.0 + math.exp(5.0))
    )  # all 4 kept pixels come from the hard image


def test_all_ignored_batch_gives_zero_loss_and_finite_gradients():
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    labels = torch.full((2, 8, 8), IGNORE)
    for top_k in (1.0, 0.2):
        loss = hard_pixel_mining_cross_entropy(logits, labels, torch.tensor([1.0, 10.0]), IGNORE, top_k)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(logits.grad).all()
        logits.grad = None


def test_gradient_is_finite_for_extreme_logits():
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]]).reshape(1, 2, 1, 2).requires_grad_()
    labels = torch.tensor([[[1, 0]]])
    loss = hard_pixel_mining_cross_entropy(logits, labels, top_k_percent_pixels=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_matches_detectron2_formula_on_random_data():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (2, 16, 16), generator=generator)
    labels[:, :4] = IGNORE
    weights = torch.tensor([1.0, 2.0, 5.0])
    pixel_losses = torch.nn.CrossEntropyLoss(weight=weights, ignore_index=IGNORE, reduction="none")(
        logits, labels
    )
    k = int(0.2 * pixel_losses.numel())
    expected = pixel_losses.flatten().topk(k).values.mean()
    loss = hard_pixel_mining_cross_entropy(logits, labels, weights, IGNORE, 0.2)
    torch.testing.assert_close(loss, expected)


def test_low_precision_logits_are_scored_in_float32():
    loss = hard_pixel_mining_cross_entropy(LOGITS.bfloat16(), LABELS, ignore_index=IGNORE)
    assert loss.dtype == torch.float32


def test_labels_of_another_size_are_refused():
    with pytest.raises(ValueError, match="do not match logits"):
        hard_pixel_mining_cross_entropy(LOGITS, torch.zeros(1, 2, 4, dtype=torch.long))
