"""Publish a command's output directory without ever deleting what the command did not write.

``mcore export --out DIR`` and ``mcore data prepare --out DIR`` build their output in a fresh
temporary sibling of ``DIR`` and rename it into place only when it is complete. ``DIR`` itself
is replaced only when it is a previous output of the same command (recognised by the
command's manifest file inside it) and the user said ``--overwrite``; an empty directory is
taken as is; anything else (a file, a directory holding other files, a run directory) is
refused with a one-line message. The only directories ever removed are the temporary sibling
this code created and a previous output recognised by its manifest.

Files and directories we write get normal permissions (``0o666``/``0o777`` less the umask):
``tempfile.mkdtemp`` makes ``0o700`` directories, and a weight file written through a
temporary file would otherwise be ``0o600``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mcore.errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normalize_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the modes ``open``/``mkdir`` would: ``0o666``/``0o777`` less the umask."""
    mask = current_umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        mode = 0o777 if path.is_dir() else 0o666
        os.chmod(path, mode & ~mask)


def check_output_dir(out: Path, *, manifest: str, what: str, overwrite: bool) -> None:
    """Refuse ``out`` unless it is absent, an empty directory, or (with ``overwrite``) a previous ``what``.

    ``manifest`` is the file name that only the command's own output holds (e.g. ``index.json``
    of prepared shards). Call it before the work starts, so a refusal costs nothing.
    """
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} exists and is not a directory; give a new directory for the {what}")
    from mcore.checkpoint.store import checkpoint_containing  # here: the checkpoint store imports this module

    holder = checkpoint_containing(Path(os.path.abspath(out)))
    if holder is not None:  # pruning removes a checkpoint's files: nothing else belongs there
        raise UserError(f"--out {out} lies inside checkpoint {holder}; give a directory outside every checkpoint")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / manifest).is_file():
        raise UserError(
            f"--out {out} already holds files that are not a {what} (no {manifest}); mcore never deletes them: "
            "give a new or empty directory"
        )
    if not overwrite:
        raise UserError(f"--out {out} holds a previous {what}; pass --overwrite to replace it, or give another --out")


@contextmanager
def publish_dir(out: Path, *, manifest: str, what: str, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to write into; on success it becomes ``out``.

    On any error the temporary directory is removed and ``out`` is left as it was. ``out`` is
    checked again (``check_output_dir``) just before it is replaced, in case it changed meanwhile.
    """
    out = Path(out)
    check_output_dir(out, manifest=manifest, what=what, overwrite=overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:  # read-only, no permission, a file on the way, a path the system will not create
        raise UserError(
            f"--out {out}: cannot create the {what} there ({exc.strerror or exc}); give a directory you can write"
        ) from None
    try:
        try:
            yield tmp
        except OSError as exc:  # a full disk, a quota, a vanished directory while writing
            raise _write_error(out, what, exc) from None
        if not (tmp / manifest).is_file():
            raise RuntimeError(f"the {what} was written without its {manifest}")  # a bug of ours, not the user's
        normalize_permissions(tmp)
        check_output_dir(out, manifest=manifest, what=what, overwrite=overwrite)
        old: Path | None = None
        if out.is_dir():
            if any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / out.name)  # a previous output of ours (checked above)
            else:
                out.rmdir()
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous output back rather than leave it hidden in ``old``
                os.replace(old / out.name, out)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old)
    except OSError as exc:  # publishing: nothing was replaced (or the previous output was put back)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out, what, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_error(out: Path, what: str, exc: OSError) -> UserError:
    where = f" ({exc.filename})" if exc.filename else ""
    return UserError(
        f"--out {out}: writing the {what} failed: {exc.strerror or exc}{where}; nothing was published and any "
        "previous output is unchanged: free disk space or give another --out"
    )
