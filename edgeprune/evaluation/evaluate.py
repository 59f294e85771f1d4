"""``eval``: run an ONNX detector over a dataset and score it with nuScenes' metrics.

Ground truth is every box at least ``min_visible_pixels`` pixels of which survive occlusion
in some camera (nuScenes likewise drops boxes no lidar point hits); predictions are PETR's
top-``top_n`` (query, class) pairs of the last decoder layer, mapped to the dataset's
classes by name.
"""
from __future__ import annotations

import os

from edgeprune.data.boxes import Boxes
from edgeprune.data.format import load_dataset
from edgeprune.evaluation.decode import last_layer, model_classes, relabel, top_detections
from edgeprune.evaluation.inference import OUTPUTS, Progress, dataset_outputs
from edgeprune.evaluation.metrics import DetectionMetrics, evaluate
from edgeprune.errors import InvalidModelError, ParameterError

TOP_N = 300                  # PETR's NMSFreeCoder max_num
MIN_VISIBLE_PIXELS = 20


def evaluate_model(model: str | os.PathLike, data: str | os.PathLike, *, top_n: int = TOP_N,
                   min_visible_pixels: int = MIN_VISIBLE_PIXELS, limit: int | None = None,
                   progress: Progress | None = None) -> DetectionMetrics:
    """Metrics of ``model`` (an ONNX whole-model export) on the dataset directory ``data``."""
    from edgeprune.export.validate import ort_session

    if top_n < 1:
        raise ParameterError(f"--top must be >= 1 (got {top_n})")
    dataset = load_dataset(data)
    sess = ort_session(model)
    missing = [n for n in OUTPUTS if n not in {o.name for o in sess.get_outputs()}]
    if missing:
        raise InvalidModelError(f"{model} lacks outputs {missing}; eval reads edgeprune's all_cls_scores / all_bbox_preds")
    classes = dataset.meta.classes
    gts: list[Boxes] = []
    preds: list[Boxes] = []
    for scene, outputs in dataset_outputs(sess, model, dataset, limit, progress):
        logits, code = last_layer(outputs[OUTPUTS[0]], outputs[OUTPUTS[1]])
        boxes = top_detections(logits[0], code[0], top_n, dataset.meta.point_cloud_range)
        preds.append(relabel(boxes, model_classes(logits.shape[-1], classes), classes))
        gts.append(dataset.ground_truth(scene, min_visible_pixels))
    return evaluate(gts, preds, classes)
