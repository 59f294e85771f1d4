"""Progress bars for long CLI work (tqdm when installed and stderr is a terminal)."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int | None = None, unit: str = "run") -> Iterator[Callable[[int, int], None] | None]:
    """Yield a ``progress(done, total)`` callback drawing a tqdm bar, or None when not interactive.

    ``total`` may be unknown up front: the callback's own total is used. The bar appears at
    the first call, so work before the first timed run (fp16 conversion, upload) shows none.
    """
    from edgeprune._lazy import available, require

    if not sys.stderr.isatty() or not available("tqdm"):
        yield None
        return
    tqdm = require("tqdm").tqdm
    bars: list = []

    def update(done: int, of: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit=unit, leave=False, mininterval=0.3))
        bar = bars[0]
        if of and bar.total != of:
            bar.total = of
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()
