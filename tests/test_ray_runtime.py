"""Where the train stage's Ray comes from, the checks made before Ray Train starts (no Ray here), and the device guard."""

from __future__ import annotations

import pytest

from pipeline.ray_runtime import RayResourceError, check_resources, is_loopback_address, wants_cluster


@pytest.mark.parametrize(
    ("address", "environ", "expected"),
    [
        (None, {}, False),
        (None, {"RAY_ADDRESS": "http://head:8265"}, True),
        ("auto", {}, True),
        ("ray://head:10001", {}, True),
    ],
)
def test_a_cluster_is_used_only_when_named(address, environ, expected):
    assert wants_cluster(address, environ) is expected


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("192.0.2.2", False), ("::", False)],
)
def test_loopback_addresses(address, loopback):
    assert is_loopback_address(address) is loopback


def test_missing_gpus_are_named_before_ray_train_waits_for_them():
    with pytest.raises(RayResourceError, match=r"GPU: 8 needed, 2 in the cluster"):
        check_resources(num_workers=8, cpus_per_worker=1, use_gpu=True, available={"CPU": 64, "GPU": 2})


def test_missing_cpus_are_named():
    with pytest.raises(RayResourceError, match=r"CPU: 4 needed, 2 in the cluster.*ray.num_workers"):
        check_resources(num_workers=2, cpus_per_worker=2, use_gpu=False, available={"CPU": 2})


def test_enough_resources_pass():
    check_resources(num_workers=2, cpus_per_worker=1, use_gpu=False, available={"CPU": 2.0})


def test_a_storage_uri_reaches_ray_untouched_and_a_path_is_created(tmp_path):
    from pipeline.cluster_checks import storage_location

    assert storage_location("s3://bucket/ray_results") == "s3://bucket/ray_results"
    assert not (tmp_path / "s3:").exists()
    local = storage_location(str(tmp_path / "runs"))
    assert local == tmp_path / "runs" and local.is_dir()


def test_an_official_sam_is_not_run_on_the_cpu_by_accident(monkeypatch):
    import torch

    from pipeline.eval_inputs import DeviceError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"no GPU for the vit_l SAM.*eval\.device=cpu"):
        resolve_device("auto", "vit_l")
    assert resolve_device("cpu", "vit_l") == "cpu"  # asked for on purpose
    assert resolve_device("auto", "small") == "cpu"
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda", "small")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "vit_l") == "cuda"
