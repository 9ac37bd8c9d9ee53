"""The container of a connection or a drop group in JSON: ``"container"`` and ``"cgroup"``.

::

    "container": {"id": "<64 hex>", "runtime": "docker"|"containerd"|"crio"|"podman"|"cri",
                  "pod_uid": "<uid>" | null} | null,
    "cgroup": "<path in the cgroup hierarchy>" | null

``cgroup`` is null when it is not known (the process is gone, or no process is in the
network namespace); ``container`` is null outside any container
(:mod:`nettracer.kernel.cgroup` says how both are found).
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.kernel.cgroup import Cgroup

_NONE = ',"container":null,"cgroup":null'
_texts: dict[Cgroup, str] = {}


def container_json(cg: Cgroup | None) -> dict[str, object]:
    """``{"container": ..., "cgroup": ...}`` of ``cg``."""
    if cg is None:
        return {"container": None, "cgroup": None}
    ct = cg.container
    return {"container": None if ct is None else ct.as_json(), "cgroup": cg.path}


def container_text(cg: Cgroup | None) -> str:
    """:func:`container_json` as the text that follows a member of a JSON object
    (``,"container":...,"cgroup":...``), remembered per cgroup (bounded)."""
    if cg is None:
        return _NONE
    text = _texts.get(cg)
    if text is None:
        if len(_texts) >= 4096:
            _texts.clear()
        text = _texts[cg] = "," + json.dumps(container_json(cg), separators=(",", ":"))[1:-1]
    return text
