"""Key reduction between decoder layers: tgGBC pruning, the ToMe and random-pruning baselines.

``feed`` is the shared mechanism (rewiring later layers' key/value projection inputs and
masks to the reduced keys, retargeting static key counts); ``tggbc``, ``tome`` and
``random_keys`` each insert their own selection, merging or constant gather and hand it to
the feeder.
"""
