"""Process states from ``/proc`` (Linux), for tests that check a server or a launcher leaves no process behind.

Why it exists: the serving tests (one engine process, torchrun's ranks) each read ``/proc`` the same way.
"""

from __future__ import annotations

from pathlib import Path


def proc_state(pid: int) -> str | None:
    """The process' state letter (``Z``: a zombie), ``None`` when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    return proc_state(pid) not in (None, "Z")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(path.parent.name))
    return found
