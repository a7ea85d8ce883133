"""The lab: a Kubernetes-like cluster built from network namespaces on one Linux machine (see DESIGN.md §5).

Entry points: :class:`Lab` (``Lab.up(config_dir, name=None, mesh=False)``, ``Lab.load(name)``), :mod:`lab.netns`
(``enter(netns)`` to open sockets inside a namespace) and :mod:`lab.client` (traffic helpers).
"""

from lab.cluster import Lab, down_all, forget
from lab.errors import LabConfigError, LabError, LabProcessError, LabStateError, NetnsError
from lab.plan import NodeInfo, PodInfo
from lab.state import ProcessRecord

__all__ = [
    "Lab",
    "LabConfigError",
    "LabError",
    "LabProcessError",
    "LabStateError",
    "NetnsError",
    "NodeInfo",
    "PodInfo",
    "ProcessRecord",
    "down_all",
    "forget",
]
