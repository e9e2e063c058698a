"""Runs in the driver: joining the Ray cluster at an address (`cluster.address`, else
RAY_ADDRESS, as under `ray job submit`), after waiting for its head to answer, or starting an
embedded local Ray without one.
"""
from __future__ import annotations

import os
import sys


def connect_ray(address: str | None, num_cpus: int | None, num_gpus: int | None,
                timeout_s: float = 120.0, verbose: bool = True) -> None:
    """Join the cluster at `address` (else RAY_ADDRESS), or start an embedded local Ray.

    A cluster that does not answer within `timeout_s` fails with one line naming the address as
    given (Ray itself retries for many minutes and names the resolved address). Without
    `verbose`, Ray forwards no worker output and prints only its errors."""
    import logging

    import ray

    if ray.is_initialized():  # called from a program (or test) that already joined a cluster
        return
    given = (f"cluster.address={address}" if address
             else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}")
    address = address or os.environ.get("RAY_ADDRESS")
    console = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
    if address:
        wait_for_cluster(address, timeout_s, given)
        local = [f"cluster.{k}={v}" for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus))
                 if v is not None]
        print(f"joining the Ray cluster at {given}"
              + (f" ({', '.join(local)}: for a local Ray only, the cluster's own resources "
                 "count)" if local else "") + " ...", flush=True)
        ray.init(address=address, **console)
    else:
        print(f"starting a local Ray ({num_cpus or 'all'} CPUs) ...", flush=True)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **console)


def head_endpoint(address: str) -> tuple[str, int] | None:
    """Host and port of a Ray address (`host:port`, `ray://host:port`, `[::1]:6379`); None
    for what Ray resolves itself (`auto`, `local`, no port)."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


REFUSED_FOR_S = 10.0
"""How long an address may answer "connection refused" (or name no host) before the wait for it
gives up: a head that is starting listens within seconds, while a machine that does not answer
at all (a firewall, a node still booting) is waited for up to `cluster.placement_timeout_s`."""


def wait_for_cluster(address: str, timeout_s: float, given: str,
                     refused_for_s: float = REFUSED_FOR_S) -> None:
    """Return once something accepts connections at the address's host and port (a head may
    still be starting); ClusterError naming `given` after `timeout_s`, or after `refused_for_s`
    of nothing but refusals: the host answered, nothing listens there."""
    import socket
    import time

    from grpo_ray.cluster.plan import ClusterError

    endpoint = head_endpoint(address)
    if endpoint is None:
        return
    start = time.monotonic()
    deadline, said, slow = start + timeout_s, False, False
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection(endpoint, timeout=max(0.1, min(5.0, left))):
                return
        except OSError as e:
            error = e.strerror or str(e) or type(e).__name__
            # a refusal, or no such host, is an answer at once; a timeout may be a slow network
            slow = slow or not isinstance(e, (ConnectionRefusedError, socket.gaierror))
        give_up = timeout_s if slow else min(timeout_s, refused_for_s)
        if not said:  # at once: the wait may be a head still starting, or a wrong address
            print(f"cannot reach the Ray cluster at {given} yet ({error}); retrying for up to "
                  f"{give_up:g} s" + ("" if give_up < timeout_s
                                      else " (cluster.placement_timeout_s)"),
                  file=sys.stderr, flush=True)
            said = True
        if time.monotonic() - start > give_up - 1.0:
            within = (f"{error} for {give_up:g} s, answered at once each time: nothing "
                      "listens there" if give_up < timeout_s
                      else f"no answer within {timeout_s:g} s (cluster.placement_timeout_s="
                           f"{timeout_s:g}; last error: {error})")
            raise ClusterError(
                f"cannot reach the Ray cluster at {given}: {within}; start its head (ray start "
                "--head), correct the address, or unset it to start a local Ray")
        time.sleep(1.0)
