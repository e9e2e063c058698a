"""(merged with the internals module of the public-API work: see the merge commit)"""
from __future__ import annotations


def draining_nodes() -> set[str]:
    """The hex ids of the nodes Ray is draining (a preemption notice, `ray drain-node`, the
    autoscaler's idle termination).

    Private: `ray._private.state.state.get_draining_nodes` (the GCS's GetDrainingNodes, what Ray
    Serve reads to move replicas off such nodes). Ray 2.60 has no public API for it: the node
    table (`ray.nodes()`, `ray.util.state.list_nodes`) says ALIVE until the node is gone."""
    from ray._private.state import state

    return set(state.get_draining_nodes())
