"""Keep the chatter of native libraries (onnxsim, the torch exporters) out of the CLI output.

onnxsim prints one ``WARNING: failed to run ...`` line per node it cannot fold, from C++,
straight to file descriptor 1; the dynamo exporter prints progress lines with emoji. Neither
goes through :mod:`logging`, so the CLI's table would drown in them. This redirects both
file descriptors into a temporary file for the duration of one call and hands the text to
the debug log (visible with ``edgeprune -v``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def native_output_to_debug_log(label: str) -> Iterator[None]:
    """Redirect fds 1 and 2 to a temporary file; log what was written at DEBUG level.

    Do not log inside the block: the logging handler writes to fd 2 and would be captured.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace").strip()
            if text:
                log.debug("%s printed:\n%s", label, text)
