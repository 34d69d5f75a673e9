"""Before step 0: every node of the Ray cluster sees Ray's run storage and the files workers read.

Ray Train writes each checkpoint from rank 0's node into ``RunConfig.storage_path`` and reads it
back on the driver (the result) and on whichever node a restarted worker lands (the resume). A
node-local folder there (the default ``.ray_results`` in the checkout, an unmounted ``/shared``)
works on one machine and fails on the second node only after the first checkpoint, minutes or
hours into the job. Likewise the workers open the training images by the paths the driver
listed. So before ``fit`` one zero-CPU Ray task per alive node (pinned to it with
:class:`~ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy`) reads a marker file the
driver has just written into the storage and ``stat``\\ s a sample of the data files; what any node
cannot see fails the stage with one message that names the node, the path and what to set.
(The SAM checkpoint needs no such check: the driver reads it once and ships it through Ray's
object store, ``stable_sam.build.SamWeights``.)
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from .run_state import repo_root

__all__ = ["StorageNotSharedError", "check_every_node", "node_view", "sample_paths", "storage_location"]

logger = logging.getLogger(__name__)

MARKER_DIR = ".stable-sam-node-check"
MAX_CHECKED_FILES = 128  # evenly spaced over the list: cheap on NFS, catches a missing mount


class StorageNotSharedError(RuntimeError):
    """A node of the Ray cluster cannot see the run storage or the training data."""


def _is_uri(storage: str) -> bool:
    return "://" in storage


def _filesystem(storage: str):
    """(pyarrow filesystem, path inside it) of a URI, the way Ray resolves ``storage_path``."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)


def _write_marker(storage: str, token: str) -> str:
    if _is_uri(storage):
        fs, root = _filesystem(storage)
        path = f"{root.rstrip('/')}/{MARKER_DIR}/{token}"
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(token.encode())
        return path
    path = Path(storage) / MARKER_DIR / token
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    return str(path)


def _remove_marker(storage: str, path: str) -> None:
    try:
        if _is_uri(storage):
            _filesystem(storage)[0].delete_file(path)
        else:
            Path(path).unlink(missing_ok=True)
    except OSError as err:  # a leftover marker is harmless: say so, do not fail the job
        logger.warning("could not remove the node-check marker %s: %s", path, err)


def node_view(storage: str, marker: str, token: str, files: Sequence[str]) -> list[str]:
    """What this node cannot see: the marker the driver wrote into ``storage``, and ``files``.

    Runs on each node (a Ray task); also callable directly. Returns problems as sentences.
    """
    problems = []
    try:
        if _is_uri(storage):
            fs = _filesystem(storage)[0]
            with fs.open_input_stream(marker) as f:
                seen = f.read().decode()
        else:
            seen = Path(marker).read_text()
        if seen != token:
            problems.append(f"Ray's run storage {storage}: the marker {marker} holds another run's token")
    except OSError as err:  # pyarrow and pathlib both raise FileNotFoundError (an OSError)
        problems.append(
            f"Ray's run storage {storage} is not the driver's: the file the driver just wrote there "
            f"({marker}) cannot be read here ({type(err).__name__}: {err})"
        )
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        problems.append(
            f"{len(missing)} of {len(files)} sampled training files are missing here, e.g. {missing[0]}"
        )
    return problems


def sample_paths(paths: Sequence[str], limit: int = MAX_CHECKED_FILES) -> list[str]:
    """Up to ``limit`` paths evenly spaced over ``paths`` (the first and the last included)."""
    if len(paths) <= limit:
        return list(paths)
    step = (len(paths) - 1) / (limit - 1)
    return [paths[round(i * step)] for i in range(limit)]


def _worker_nodes(use_gpu: bool) -> list[dict]:
    import ray

    need = "GPU" if use_gpu else "CPU"
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(need, 0) > 0]


def check_every_node(
    *, storage: str | os.PathLike, files: Sequence[str], use_gpu: bool, timeout_s: float = 300.0
) -> int:
    """Check, on every alive node that can host a training worker, that it reads what the driver
    wrote into ``storage`` and finds ``files`` (a sample of them); returns the number of nodes.

    Raises:
      StorageNotSharedError: one line per node and problem, then what to set.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    storage = str(storage)
    token = uuid.uuid4().hex
    marker = _write_marker(storage, token)
    try:
        nodes = _worker_nodes(use_gpu)
        task = ray.remote(node_view)
        checked = sample_paths(list(files))
        refs = [
            task.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False),
            ).remote(storage, marker, token, checked)
            for n in nodes
        ]
        views = ray.get(refs, timeout=timeout_s)
    finally:
        _remove_marker(storage, marker)
    problems = [
        f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]}): {p}"
        for n, view in zip(nodes, views)
        for p in view
    ]
    if problems:
        raise StorageNotSharedError(
            "not every node of the Ray cluster sees what the training workers need:\n  - "
            + "\n  - ".join(problems)
            + "\nSet ray.storage_path to a folder every node mounts at the same path (NFS) or to a URI "
            "(s3://bucket/prefix, gs://...), and keep the training data (data/occluded, or data/raw "
            "with train.use_occlusion=false) on storage shared by every node at the same path "
            "(README, 'What the cluster needs')."
        )
    logger.info("%d node(s) see the run storage %s and the training data", len(nodes), storage)
    return len(nodes)


def storage_location(storage_path: str | None) -> Path | str:
    """Ray's run storage: a URI (``s3://``, ``gs://``, ...) is passed to Ray untouched (pyarrow's
    filesystems resolve it); a local path is created. None: ``.ray_results`` in the checkout."""
    if storage_path and _is_uri(storage_path):
        return storage_path
    storage = Path(storage_path).expanduser() if storage_path else repo_root() / ".ray_results"
    storage.mkdir(parents=True, exist_ok=True)
    return storage
