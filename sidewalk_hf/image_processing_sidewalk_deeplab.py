"""Image processor of the sidewalk DeepLabV3+ model: the single source of input normalisation.

Training reads `image_mean`, `image_std` and `rescale_factor` from it, and it is saved beside the model so
that `pipeline("image-segmentation")` normalises exactly as training did. A model trained on chips cut from
rasters also carries the rule that made them (`pixel_rule`: bands and scaling to 8 bits, as
`sidewalk_hf.geo.raster.PixelRule.to_dict` writes it), so that inference over rasters reads them the same way.
"""

from transformers import SegformerImageProcessor


class SidewalkImageProcessor(SegformerImageProcessor):
    r"""
    Segformer's processor with the sidewalk model's defaults: chips keep their size (the model takes any
    size), pixels are rescaled by 1/255 and normalised with the configuration's per-band mean and standard
    deviation (given on the 0-255 scale there, hence divided by 255 here), and mask values are kept as they
    are (0 is background, not "no label"). `post_process_semantic_segmentation(outputs, target_sizes)` is
    Segformer's: bilinear resize of the logits to each target size, then argmax.
    """

    do_resize = False
    do_reduce_labels = False

    def __init__(self, *args, pixel_rule: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # {"bands": [2, 3, 4] | None, "scale": "fixed:0,65535", "ranges": [[lo, hi], ...] | None}, or None when
        # the training chips were 8-bit images taken as they are. Saved in preprocessor_config.json.
        self.pixel_rule = dict(pixel_rule) if pixel_rule else None

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "SidewalkImageProcessor":
        """The processor of a `SidewalkDeepLabConfig`: its `image_mean`/`image_std` on the 0-1 scale (and
        `pixel_rule=` the rule of the training dataset, when it records one)."""
        return cls(
            image_mean=[mean / 255.0 for mean in config.image_mean],
            image_std=[std / 255.0 for std in config.image_std],
            rescale_factor=1 / 255,
            **kwargs,
        )
