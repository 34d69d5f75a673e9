"""Where the train stage's Ray comes from: a cluster the user names, or a private loopback Ray.

- ``ray.address`` set, or ``RAY_ADDRESS`` in the environment (``ray job submit`` sets it): connect
  to that cluster with the user's own authentication settings (Ray 2.60 token auth included);
  nothing here touches ``RAY_AUTH_MODE`` then. ``ray.address: auto`` joins the ``ray start``
  cluster of this machine.
- Otherwise: start a new Ray for this process only, every server of it on the loopback interface.
  Only then is token authentication left off (``RAY_AUTH_MODE=disabled`` unless the user set a
  mode), because nothing outside this machine can reach it. Ray binds its GCS, raylet, workers and
  agents to the node IP; on Linux that is the interface address unless Ray's single-machine mode
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the mode Ray uses on macOS and Windows) is on, which
  makes the node IP 127.0.0.1. The mode is read when ``ray`` is imported, so the stage sets it
  before its first ``import ray`` and checks the result: a local Ray that is not on loopback is
  shut down and refused, never used.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping

__all__ = [
    "LOOPBACK_ENVIRONMENT",
    "RayResourceError",
    "UnsafeRayError",
    "check_resources",
    "init_ray",
    "is_loopback_address",
    "is_loopback_ray",
    "prepare_local_ray_environment",
    "wants_cluster",
]

logger = logging.getLogger(__name__)

# Ray's single-machine mode (node IP = loopback); auth off only for that private instance.
LOOPBACK_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOCAL_AUTH_ENVIRONMENT = {"RAY_AUTH_MODE": "disabled"}


class UnsafeRayError(RuntimeError):
    """A Ray the project started for itself would be reachable from other machines."""


class RayResourceError(RuntimeError):
    """The Ray cluster cannot place the requested workers (Ray Train would wait forever)."""


def wants_cluster(address: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """True when the user names a cluster (``ray.address`` or ``RAY_ADDRESS``)."""
    environ = os.environ if environ is None else environ
    return bool(address) or bool(environ.get("RAY_ADDRESS"))


def prepare_local_ray_environment() -> None:
    """Set the environment of a private loopback Ray. Call before ``ray`` is first imported."""
    for key, value in LOOPBACK_ENVIRONMENT.items():
        os.environ[key] = value
    for key, value in LOCAL_AUTH_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def is_loopback_address(address: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``, as psutil reports it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def is_loopback_ray() -> bool:
    """True when the connected Ray's node (this driver's) is on a loopback address."""
    import ray

    return is_loopback_address(ray.util.get_node_ip_address())


def init_ray(address: str | None, **init_kwargs) -> str:
    """Connect to the user's cluster or start a private loopback Ray; returns which ("cluster"/"local").

    Raises:
      UnsafeRayError: the private Ray's node IP is not a loopback address (it was shut down).
    """
    if wants_cluster(address):
        import ray

        ray.init(address=address, **init_kwargs)
        return "cluster"
    prepare_local_ray_environment()
    import ray

    ray.init(address="local", **init_kwargs)
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback_address(node_ip):
        ray.shutdown()
        raise UnsafeRayError(
            f"the local Ray started on {node_ip}, not on loopback: it would accept connections from "
            "other machines without authentication. `ray` was imported before the stage could set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; set it in the environment, or set ray.address "
            "to a cluster with token authentication"
        )
    logger.info("started a private Ray on %s (loopback only, token auth off)", node_ip)
    return "local"


def check_resources(
    *, num_workers: int, cpus_per_worker: float, use_gpu: bool, available: Mapping[str, float] | None = None
) -> None:
    """Fail now, naming what is missing, when the cluster cannot hold ``num_workers`` workers.

    Ray Train waits without end for resources that never come (``dvc repro`` hangs). This counts
    what the cluster has now (an autoscaling cluster could still grow, but a fixed 8-GPU job
    needs its GPUs at once).
    """
    if available is None:
        import ray

        available = ray.cluster_resources()
    need = {"CPU": num_workers * cpus_per_worker}
    if use_gpu:
        need["GPU"] = float(num_workers)
    missing = {k: (v, float(available.get(k, 0.0))) for k, v in need.items() if available.get(k, 0.0) < v}
    if missing:
        detail = ", ".join(
            f"{k}: {need:g} needed, {have:g} in the cluster" for k, (need, have) in missing.items()
        )
        raise RayResourceError(
            f"ray.num_workers={num_workers} x (CPU {cpus_per_worker:g}"
            f"{', GPU 1' if use_gpu else ''}) does not fit the Ray cluster ({detail}); "
            "lower ray.num_workers or ray.cpus_per_worker, or add nodes"
        )
