"""The one policy for the files edgeprune reads and writes.

Every command declares its inputs and outputs once, before any long work
(:func:`check_command_files`), and every writer goes through :func:`atomic_path`:

- an output must be a regular file or a new path: a device, FIFO or directory is refused
  (replacing ``/dev/null`` with a model, or the ``/dev/stdout`` link with a file, destroys
  something that is not ours); ``-`` means stdout where a command allows it (reports);
- an output may not be any input of the same command, nor another of its outputs (also
  through ``./sub/../x``, symlinks and hard links): ``rewrite in.onnx -o in.onnx`` would
  destroy the input, ``--json r --csv r`` would keep only one report;
- a symlinked output is written through to its target (the link stays a link);
- a replaced file keeps its mode; a new file gets the umask's default (as ``open`` would),
  not ``mkstemp``'s 0600;
- the data is written to a temporary file beside the target and renamed onto it, so a failed
  or interrupted command never leaves a half-written output;
- an input must be a regular file (a FIFO would block forever, ``/dev/zero`` would be read
  until memory runs out) no larger than its kind allows.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence, Union

if TYPE_CHECKING:
    import numpy as np

from edgeprune.errors import InputFileError, ModelNotFoundError, OutputPathError

STDOUT = "-"
#: never written to, whatever the file there is: /dev/stdout may be a link to a regular file
SPECIAL_ROOTS = (Path("/dev"), Path("/proc"))
PathArg = Union[str, "os.PathLike[str]"]
#: a declared file: one path, several (``bench A B``), or None (option not given)
Declared = Union[PathArg, Sequence[PathArg], None]


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for error messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


# ------------------------------------------------------------------------------ inputs
def check_input_file(path: PathArg, what: str = "input", max_bytes: int | None = None) -> os.stat_result | None:
    """Refuse an input that is not a regular file, or bigger than ``max_bytes``.

    Returns the file's stat, or None when it does not exist (the reader names the missing
    file with its own advice). Checked before opening: opening a FIFO blocks until a writer
    comes, and a device such as ``/dev/zero`` never ends.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        hint = "; give the path of a file" if stat.S_ISDIR(st.st_mode) else "; copy it to a regular file first"
        raise InputFileError(f"{what} {path} is {file_kind(st.st_mode)}, not a regular file{hint}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise InputFileError(f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} a {what} "
                             f"can be; is it the right file?")
    return st


def read_input_bytes(path: PathArg, what: str = "input", max_bytes: int | None = None) -> bytes:
    """The whole file, after :func:`check_input_file` (a missing file raises FileNotFoundError)."""
    if check_input_file(path, what, max_bytes) is None:
        raise FileNotFoundError(2, "No such file or directory", str(path))
    with open(path, "rb") as fh:
        return fh.read()


def read_npz(path: PathArg, what: str, missing_hint: str) -> dict[str, "np.ndarray"]:
    """The arrays of an ``.npz`` by name: the one reader of user arrays (``--inputs``, ``--calib``).

    A missing file says ``missing_hint``; a file numpy cannot read as ``.npz`` (corrupt zip, a
    ``.npy``, a pickle) and arrays holding NaN or Inf are one-line errors: NaN inputs make every
    comparison "exact" and NaN calibration silently decides a ranking.
    """
    import zipfile
    import zlib

    import numpy as np

    if check_input_file(path, what) is None:
        raise ModelNotFoundError(f"{what} {path} does not exist; {missing_hint}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array (.npy), not an .npz archive")  # noqa: TRY004 (caught below)
        with data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"cannot read {what} {path} ({reason}); expected an .npz written by numpy.savez") from exc
    for name, arr in arrays.items():
        if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise InputFileError(f"{what} {path}: array {name!r} {list(arr.shape)} holds {bad} NaN/Inf value(s); "
                                 "give finite data")
    return arrays


# ------------------------------------------------------------------------------ outputs
def write_target(path: PathArg) -> Path:
    """Where writing ``path`` really goes: through symlinks to their target."""
    return Path(os.path.realpath(path))


def check_writable(path: PathArg) -> Path:
    """Fail early (before long work) when ``path`` cannot be written as a regular file.

    Returns ``path`` as given (for messages); :func:`write_target` says where it lands.
    """
    target = Path(path)
    if any(root in Path(os.path.abspath(target)).parents or root in write_target(target).parents
           for root in SPECIAL_ROOTS):
        raise OutputPathError(f"output path {target} is under {' or '.join(map(str, SPECIAL_ROOTS))} (devices, "
                              "process files), which edgeprune never replaces; give a file name"
                              " (reports: '-' writes to stdout)")
    try:
        st: os.stat_result | None = os.stat(target)        # follows symlinks: judges the target
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputPathError(f"cannot write {target}: {exc.strerror}; choose another path") from exc
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"output path {target} is a directory; give a file name such as {target}/model.onnx")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"output path {target} is {file_kind(st.st_mode)}, not a regular file; "
                              "edgeprune replaces only regular files: choose a file name"
                              " (reports: '-' writes to stdout)")
    real = write_target(target)
    parent = real.parent
    if not Path(target.parent if str(target.parent) else ".").is_dir() or not parent.is_dir():
        raise OutputPathError(f"cannot write {target}: directory {target.parent} does not exist; "
                              "create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write {target}: directory {parent} is not writable; choose another path")
    return target


def _identity(path: PathArg) -> tuple[str, tuple[int, int] | None]:
    """(real path, (device, inode) if the file exists): equal for two names of one file."""
    try:
        st = os.stat(path)
        inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


def _same(a: tuple[str, tuple[int, int] | None], b: tuple[str, tuple[int, int] | None]) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def _flatten(declared: Mapping[str, Declared]) -> list[tuple[str, str]]:
    """(label, path) pairs of the given files, in order."""
    pairs = []
    for label, value in declared.items():
        if value is None:
            continue
        values: Iterable[PathArg] = value if isinstance(value, (list, tuple)) else [value]   # type: ignore[assignment]
        pairs += [(label, os.fspath(v)) for v in values if v is not None and os.fspath(v) != ""]
    return pairs


@dataclass(frozen=True)
class CommandFiles:
    """What a command reads and writes, checked: ``outputs`` maps label -> path or ``-``."""

    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]

    def to_stdout(self, label: str) -> bool:
        return any(lab == label and path == STDOUT for lab, path in self.outputs)


def check_command_files(inputs: Mapping[str, Declared], outputs: Mapping[str, Declared], *,
                        stdout: Iterable[str] = ()) -> CommandFiles:
    """The output policy for one command (see the module docstring); call it once, before work.

    ``inputs``/``outputs`` map the option that names a file (``"IN.onnx"``, ``"--calib"``,
    ``"-o"``) to its path(s) or None. Labels in ``stdout`` may be ``-``. Raises
    InputFileError / OutputPathError with one line naming both options.
    """
    allowed = set(stdout)
    ins = _flatten(inputs)
    for label, path in ins:
        check_input_file(path, f"input {label}")
    seen: list[tuple[str, str, tuple[str, tuple[int, int] | None]]] = [
        (label, path, _identity(path)) for label, path in ins]
    outs = _flatten(outputs)
    to_stdout: list[str] = []
    for label, path in outs:
        if path == STDOUT:
            if label not in allowed:
                raise OutputPathError(f"{label} cannot write to stdout ('-'); give a file name")
            to_stdout.append(label)
            continue
        check_writable(path)
        ident = _identity(path)
        for other_label, other_path, other in seen:
            if _same(ident, other):
                role = "input" if (other_label, other_path) in ins else "output"
                raise OutputPathError(f"{label} {path} is the same file as the {role} {other_label} {other_path}; "
                                      f"writing it would destroy that {role}: choose another path")
        seen.append((label, path, ident))
    if len(to_stdout) > 1:
        raise OutputPathError(f"{' and '.join(to_stdout)} both write to stdout ('-'); send at most one there")
    return CommandFiles(tuple(ins), tuple(outs))


#: errors of writing, whoever raised them without a file name (onnx's serializer, numpy)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _default_mode() -> int:
    """What ``open(path, "w")`` would give a new file under the current umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: PathArg, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``'s real target; rename it onto the target on success.

    A symlinked ``path`` stays a link to the new file. The result keeps the mode of the file it
    replaces, or gets the umask's default. Extra files written next to the temporary one (ONNX
    external data) are the caller's to name after the final path.
    """
    check_writable(path)
    target = write_target(path)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS and exc.filename not in (str(tmp_path), str(target)):
            raise
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_report(path: PathArg, text: str, suffix: str = "") -> Path:
    """A text report to ``path`` (atomically), or to stdout for ``-``; returns where it went."""
    if str(path) == STDOUT:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return Path(STDOUT)
    target = Path(path)
    with atomic_path(target, suffix=suffix) as tmp:
        tmp.write_text(text)
    return target
