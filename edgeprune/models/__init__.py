"""Reference PETR-family models in plain torch (no mmcv / mmdet3d / torchvision)."""
