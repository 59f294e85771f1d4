"""Training the ``demo`` detector from scratch on synthetic scenes (``edgeprune train-demo``).

DETR-style set prediction, as PETR trains: every decoder layer's predictions are matched
one-to-one to the ground truth (:mod:`.matcher`, Hungarian), then scored with a sigmoid focal
loss for classes and an L1 loss for boxes (:mod:`.losses`); :mod:`.data` turns a dataset
directory into image batches and targets; :mod:`.loop` runs the optimiser with a time budget,
a log file and resumable checkpoints.
"""
