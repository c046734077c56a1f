"""Writing output files atomically: a temporary file beside the target, then a rename.

An interrupted write never leaves a half-written file, and the target is only
replaced once the new content is complete. Asked not to replace, the last step is a
hard link instead, which fails if the target exists by then: a file that appears
while the content is written is kept too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputExists(FileExistsError):
    """An output path that is taken, and that was not to be replaced.

    The message names the library's option (``overwrite=True``); :meth:`for_cli`
    words it with the command line's (``--force``).
    """

    def __init__(self, path: str | os.PathLike, when: str = "exists",
                 resume: bool = False) -> None:
        self.path, self.when, self.resume = Path(path), when, resume
        # The message only: with ``filename`` set, OSError's str() would show errno None.
        super().__init__(self._message("overwrite=True", "resume=True"))

    def __reduce__(self):  # pickled and copied with its fields, not its message
        return type(self), (self.path, self.when, self.resume)

    def _message(self, force: str, resume: str) -> str:
        also = f", or {resume} to continue its run" if self.resume else ""
        return f"{str(self.path)!r} {self.when}; it is kept (pass {force} to replace it{also})"

    def for_cli(self) -> str:
        return self._message("--force", "--resume")


def _link_new(tmp: Path, path: Path) -> None:
    """Give ``tmp``'s content the name ``path`` only if no file has that name yet."""
    try:
        os.link(tmp, path)  # atomic: fails if ``path`` exists
    except FileExistsError:
        raise OutputExists(path, "appeared while it was being written") from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise OutputExists(path, "appeared while it was being written") from None
        os.replace(tmp, path)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], *,
                     replace: bool = True) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``.

    ``write`` receives the temporary path, whose suffix is that of ``path`` (some
    writers, such as matplotlib's, choose the format by suffix). With
    ``replace=False`` an existing ``path`` is never replaced: :class:`OutputExists`
    before ``write`` runs, or after it if ``path`` appeared meanwhile.
    """
    path = Path(path)
    if not replace and path.exists():
        raise OutputExists(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0o600; give a new file's mode
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | os.PathLike, text: str, *, replace: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_atomically`)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"),
                            replace=replace)
