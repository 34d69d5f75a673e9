"""The train stage's check, before step 0, that every Ray node sees the run storage and the data."""

from __future__ import annotations

import pytest
from _tiny_project import local_ray_session

from pipeline.cluster_checks import (
    MARKER_DIR,
    StorageNotSharedError,
    check_every_node,
    node_view,
    sample_paths,
)

local_ray = pytest.fixture(scope="session")(local_ray_session)


def test_sampled_paths_are_evenly_spaced_and_keep_both_ends():
    paths = [f"f{i}" for i in range(1000)]
    sample = sample_paths(paths, limit=5)
    assert sample == ["f0", "f250", "f500", "f749", "f999"]
    assert sample_paths(paths[:3], limit=5) == paths[:3]


def test_a_node_that_does_not_see_the_marker_or_the_data_says_so(tmp_path):
    marker = tmp_path / MARKER_DIR / "token"
    data = tmp_path / "a.jpg"
    data.write_bytes(b"x")
    # Not written: what a node whose storage folder is its own local disk sees.
    problems = node_view(str(tmp_path), str(marker), "token", [str(data), str(tmp_path / "b.png")])
    assert len(problems) == 2
    assert "is not the driver's" in problems[0] and str(marker) in problems[0]
    assert "1 of 2 sampled training files are missing here, e.g. " + str(tmp_path / "b.png") in problems[1]
    marker.parent.mkdir()
    marker.write_text("another")
    assert "another run's token" in node_view(str(tmp_path), str(marker), "token", [str(data)])[0]
    marker.write_text("token")
    assert node_view(str(tmp_path), str(marker), "token", [str(data)]) == []


@pytest.mark.slow
def test_every_node_is_checked_and_a_missing_file_names_the_node_and_what_to_set(local_ray, tmp_path):
    import ray

    storage = tmp_path / "ray_results"
    files = []
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"x")
        files.append(str(tmp_path / f"{i}.jpg"))
    assert check_every_node(storage=storage, files=files, use_gpu=False) == 1
    assert list((storage / MARKER_DIR).iterdir()) == []  # the marker is removed again
    node = ray.nodes()[0]["NodeManagerAddress"]
    with pytest.raises(StorageNotSharedError) as err:
        check_every_node(storage=storage, files=[*files, str(tmp_path / "gone.png")], use_gpu=False)
    message = str(err.value)
    assert f"node {node}" in message and "gone.png" in message
    assert "ray.storage_path" in message and "shared by every node" in message
