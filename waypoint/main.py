"""ambit-waypoint: the optional L7 proxy (an Envoy process programmed by the controller over xDS).

Not part of this release: agents never route through a waypoint yet (services and workloads that name one are
reached directly). The command exists so that manifests and operators' tooling can refer to it; it refuses to
start rather than pretending to proxy.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    del argv
    sys.exit("ambit-waypoint: waypoints (L7 routing and policy) are not implemented in this release; see docs/")


if __name__ == "__main__":
    main()
