"""Synthetic multi-camera scenes for measuring accuracy: sampling, rendering, on-disk format.

``boxes`` holds the 3D box type and the model's box code (shared by training and
evaluation), ``synth`` samples scenes, ``render`` draws them into the six cameras of the
rig in :mod:`edgeprune.models.position`, and ``format`` writes and reads a dataset
directory (the format is documented there). Everything here is numpy; only the rig matrices
come from the torch-side ``models.position`` (imported when a dataset is generated).
"""
