"""Keep every file a checkpoint load opens inside the checkpoint directory.

A checkpoint's files name other files: DCP's ``.metadata`` gives each tensor a
``relative_path``, and the manifest lists file names. A crafted checkpoint could point them
at ``/etc/...``, at ``../other_run/...`` or at a symlink leading out of the directory; such a
load would read (and with DCP's ``torch.load`` parse) files the user never gave us. Every
name goes through ``inside`` before it is opened.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from mcore.errors import UserError


def inside(root: Path, name: object, *, what: str = "file", owner: str = "checkpoint") -> Path:
    """``root / name`` if ``name`` is a plain relative name that resolves inside ``root``.

    Refused (``UserError``): a non-string, an empty name, an absolute path, any ``..`` part,
    a backslash, and a name whose resolved path (symlinks followed) leaves ``root``. ``owner``
    names what ``root`` is in the message (a prepared dataset's index names files too).
    """
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UserError(f"{owner} {root} names a {what} {name!r}, which is not a plain file name; it was not read")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise UserError(f"{owner} {root} names a {what} {name!r} outside its directory; only files inside it are read")
    base = Path(root).resolve()
    path = Path(root) / pure
    if not path.resolve().is_relative_to(base):
        raise UserError(f"{owner} {root}: {name!r} is a link leading outside the {owner} directory; it was not read")
    return path
