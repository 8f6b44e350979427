"""Write real (unpacked) distributions onto a sys.path folder so importlib.metadata finds them.

A distribution here is a ``<name>-<version>.dist-info`` folder with METADATA and
``entry_points.txt`` plus the plugin module beside it: exactly what pip would install.
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_distribution(
    site: Path, dist: str, version: str, module: str, source: str, *, ep_name: str | None = None
) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[mcore]\n{ep_name or module} = {module}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    (info / "RECORD").write_text("")


def plugin_source(*registrations: str, api: int = 1, body: str = "") -> str:
    lines = "\n".join(f"    registry.add({r})" for r in registrations) or "    pass"
    return (
        "from mcore.plugins import hookimpl\n"
        f"MCORE_PLUGIN_API = {api}\n"
        f"{body}\n"
        "@hookimpl\n"
        "def mcore_register(registry):\n"
        f"{lines}\n"
    )
