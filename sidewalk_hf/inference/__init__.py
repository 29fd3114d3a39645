"""Large-area inference: rasters in (GeoTIFF, COG, VRT; any CRS, bit depth, band count), georeferenced masks out.

``predict_rasters`` runs a whole job (see ``run.py``); ``predict_part`` is the per-raster work every engine
shares (see ``predictor.py``); ``load_inference_model`` loads a folder, run folder or Hub id once.
"""

from .model_loading import InferenceModel, load_inference_model
from .predictor import InferenceOptions, Part, RasterPlan, plan_raster, predict_part, split_into_parts
from .run import OutputFolderError, predict_rasters
from .windows import WindowGrid, blend_weights, seam_ratio

__all__ = [
    "InferenceModel",
    "InferenceOptions",
    "OutputFolderError",
    "Part",
    "RasterPlan",
    "WindowGrid",
    "blend_weights",
    "load_inference_model",
    "plan_raster",
    "predict_part",
    "predict_rasters",
    "seam_ratio",
    "split_into_parts",
]
