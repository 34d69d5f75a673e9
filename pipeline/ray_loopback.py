"""torch.distributed on loopback for the private local Ray (see :mod:`pipeline.ray_runtime`).

Ray Train's ``TorchConfig`` rendezvous (``env://``) makes rank 0 start torch's ``TCPStore``, whose
server listens on every interface, and gloo picks the interface of the host name: a training run
on a developer's machine would open both to the network. For the private Ray only, this backend
binds the store to 127.0.0.1 itself (``master_listen_fd``) and gloo to ``lo``. Clusters keep Ray's
own ``TorchConfig``. Imports ``ray``: import it only after :func:`pipeline.ray_runtime.init_ray`.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig

# Ray Train's own backend and its env-var helper (LOCAL_RANK, ...): kept, only the rendezvous changes.
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

__all__ = ["LoopbackTorchConfig"]

_LISTENER: list[socket.socket] = []  # rank 0 keeps the store's bound socket open for the run


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_process_group(*, world_rank: int, world_size: int, port: int, timeout_s: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_rank == 0:
        listener = socket.create_server(("127.0.0.1", port))
        _LISTENER.append(listener)
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=True, master_listen_fd=listener.fileno(),
            wait_for_workers=False, timeout=timeout,
        )  # fmt: skip
    else:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        port = worker_group.execute_single(0, _free_loopback_port)
        worker_group.execute(_set_torch_distributed_env_vars)
        futures = [
            worker_group.execute_single_async(
                i,
                _loopback_process_group,
                world_rank=i,
                world_size=len(worker_group),
                port=port,
                timeout_s=backend_config.timeout_s,
            )
            for i in range(len(worker_group))
        ]
        ray.get(futures)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` for CPU workers of a single-machine Ray: gloo, rendezvous on 127.0.0.1."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
