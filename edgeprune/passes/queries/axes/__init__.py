from edgeprune.passes.queries.axes.propagate import *  # noqa: F401,F403  (temporary during the split)
from edgeprune.passes.queries.axes.propagate import _normalize  # noqa: F401
