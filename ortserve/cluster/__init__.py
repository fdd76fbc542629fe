"""ortserve beyond one host: the Ray Serve application (docs/cluster.md).

`serve run ortserve.cluster:app` (or `ortserve.cluster:build` with ORTSERVE_*=... arguments)
and `ortserve serve --ray`. Needs the `ray` extra: pip install 'ortserve[ray]'.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """`app` and `build` on first use: importing Ray and reading the settings take time."""
    if name == "build":
        from ortserve.cluster.deployments import build

        return build
    if name == "app":
        from ortserve.cluster.deployments import build

        return build()
    raise AttributeError(name)
