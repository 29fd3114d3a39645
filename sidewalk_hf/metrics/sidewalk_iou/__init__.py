"""The `sidewalk_iou` evaluate module; `sidewalk_iou.py` is the file `evaluate.load` reads."""
