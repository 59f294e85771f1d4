"""Key reduction between decoder layers: tgGBC pruning and the ToMe baseline.

``feed`` is the shared mechanism (rewiring later layers' key/value projection inputs and
masks to the reduced keys, retargeting static key counts); ``tggbc`` and ``tome`` each
insert their own selection or merging subgraph and hand it to the feeder.
"""
