"""What the cluster rehearsal (``test_rehearsal.py``) stands up: the data a real run finds, and the
services a team runs, all on 127.0.0.1.

- :func:`write_fake_hqseg44k` / :func:`write_fake_coco`: a fake HQSeg-44K and COCO val2017 tree in
  the real folder and file names (the folders come from the project's registry, the one home of
  the real layout), with a stray mask and a corrupt image in it.
- :func:`write_meta_like_checkpoint`: a vit_b-shaped SAM with random weights saved the way Meta's
  ``sam_vit_b_01ec64.pth`` is (a plain state dict).
- :class:`Services`: a local S3 (moto's server mode), a real ``mlflow server`` over HTTP whose
  artifact store is that S3, and a ``ray start --head`` cluster; stopped by their process trees.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _tiny_project import free_port, http_ok, ray_head_port_flags, start_logged, stop_process_tree, wait_for

from pipeline.sources import generate_split
from stable_sam.data.registry import HQSEG44K_TRAIN, HQSEG_EVAL

BUCKETS = ("ray-results", "mlflow-artifacts", "dvc-remote")
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "rehearsal",
    "AWS_SECRET_ACCESS_KEY": "rehearsal",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Stems in each set's own naming (DIS5K's '#'-separated names, DUTS' ILSVRC names, ...).
_STEMS = {
    "DIS5K-TR": "1#Accessories#1#Bag#{i}_83cb1dfc8e_o",
    "DIS-VD": "10#Frame#5#Rack#{i}_d9b4b2a2b1_o",
    "ThinObject5K-TR": "bicycle_{i:04d}",
    "ThinObject5K-TE": "chair_{i:04d}",
    "FSS": "ab_wheel_{i}",
    "DUTS-TR": "ILSVRC2012_test_{i:08d}",
    "DUTS-TE": "ILSVRC2012_test_{i:08d}",
    "ECSSD": "{i:04d}",
    "MSRA10K": "{i}",
    "COIFT": "{i}",
    "HR-SOD": "{i:04d}",
}


def _generate(root: Path, count: int, seed: int, split: str, size: int) -> Path:
    out = root / split
    generate_split(out, num_images=count, image_size=size, generator_seed=seed, split=split)
    return out


def write_fake_hqseg44k(local_root: Path, *, per_folder: int = 1, pool: Path) -> dict[str, str]:
    """Every HQSeg-44K folder the registry knows (train mix + the four HQ sets), under
    ``local_root/hqseg44k``, ``per_folder`` pairs each, plus a stray mask (DIS-TR) and a truncated
    JPEG (DUTS-TR). Returns {"stray": path, "corrupt": path}."""
    specs = [*HQSEG44K_TRAIN, *HQSEG_EVAL]
    scenes = _generate(pool, per_folder * len(specs) + 1, 7, "fake", 96)
    family = local_root / "hqseg44k"
    index = 0
    for spec in specs:
        im_dir, gt_dir = family / spec.im_dir, family / spec.gt_dir
        im_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            stem = _STEMS[spec.name].format(i=i + 1)
            name = f"fake_{index:05d}"
            shutil.copy(scenes / "im" / f"{name}.jpg", im_dir / f"{stem}{spec.im_ext}")
            shutil.copy(scenes / "gt" / f"{name}.png", gt_dir / f"{stem}{spec.gt_ext}")
            index += 1
    dis_tr = next(s for s in specs if s.name == "DIS5K-TR")
    stray = family / dis_tr.gt_dir / "1#Accessories#1#Bag#no_image.png"
    shutil.copy(scenes / "gt" / f"fake_{index:05d}.png", stray)
    duts = next(s for s in specs if s.name == "DUTS-TR")
    corrupt = family / duts.im_dir / f"ILSVRC2012_test_99999999{duts.im_ext}"
    data = (scenes / "im" / f"fake_{index:05d}.jpg").read_bytes()
    corrupt.write_bytes(data[: len(data) // 3])  # a truncated download
    shutil.copy(
        scenes / "gt" / f"fake_{index:05d}.png", family / duts.gt_dir / f"{corrupt.stem}{duts.gt_ext}"
    )
    return {"stray": str(stray), "corrupt": str(corrupt)}


def write_fake_coco(local_root: Path, *, images: int = 2, pool: Path) -> Path:
    """COCO val2017 in its real names: ``coco/val2017/000000000139.jpg`` ... and
    ``coco/annotations/instances_val2017.json`` (COCO image ids, RLE masks, category ids)."""
    scenes = _generate(pool, images, 11, "coco", 128)
    content = json.loads((scenes / "instances.json").read_text())
    coco_ids = [139, 285, 632, 724, 776, 785][:images]
    (local_root / "coco" / "val2017").mkdir(parents=True, exist_ok=True)
    (local_root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    renamed = {}
    for entry, coco_id in zip(content["images"], coco_ids):
        file_name = f"{coco_id:012d}.jpg"
        shutil.copy(scenes / "im" / entry["file_name"], local_root / "coco" / "val2017" / file_name)
        renamed[entry["id"]] = coco_id
        entry.update(id=coco_id, file_name=file_name)
        entry.pop("target_instance", None)
    for ann in content["annotations"]:
        ann["image_id"] = renamed[ann["image_id"]]
    path = local_root / "coco" / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(content))
    return path


def write_meta_like_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A vit_b-shaped SAM with random weights, saved as a plain state dict (as Meta ships it)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    torch.save(sam.state_dict(), path)
    return path


class Services:
    """S3 (moto), an MLflow tracking server on that S3, a Ray head: started, then stopped by PIDs."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.s3_url = f"http://127.0.0.1:{free_port()}"
        self.mlflow_url = f"http://127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: unix socket paths
        self.env = {
            **env,
            **S3_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.s3_url,  # boto3, pyarrow (Ray's storage) and s3fs (DVC) read it
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "RAY_AUTH_MODE": "disabled",  # both `ray start` and `ray job submit` (README)
        }
        self.procs: list[subprocess.Popen] = []

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def start(self) -> Services:
        s3_port = self.s3_url.rsplit(":", 1)[1]
        self.procs.append(
            start_logged(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", s3_port],
                self.root / "s3.log", self.env, self.root,
            )
        )  # fmt: skip
        wait_for(lambda: http_ok(f"{self.s3_url}/moto-api/"), timeout=60, what="the S3 server")
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, **_boto_credentials())
        for bucket in BUCKETS:
            s3.create_bucket(Bucket=bucket)
        mlflow_port = self.mlflow_url.rsplit(":", 1)[1]
        self.procs.append(
            start_logged(
                [
                    self._bin("mlflow"), "server", "--host", "127.0.0.1", "--port", mlflow_port,
                    "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination", f"s3://{BUCKETS[1]}/mlartifacts", "--workers", "1",
                ],
                self.root / "mlflow.log", self.env, self.root,
            )
        )  # fmt: skip
        dashboard_port = self.dashboard.rsplit(":", 1)[1]
        self.procs.append(
            start_logged(
                [
                    self._bin("ray"), "start", "--head", *ray_head_port_flags(),
                    "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}", "--num-cpus=2", "--disable-usage-stats",
                    f"--temp-dir={self.ray_tmp}", "--block",
                ],
                self.root / "ray_head.log", self.env, self.root,
            )
        )  # fmt: skip
        wait_for(lambda: http_ok(f"{self.mlflow_url}/health"), timeout=180, what="the MLflow server")
        wait_for(lambda: http_ok(f"{self.dashboard}/api/version"), timeout=180, what="the Ray head")
        return self

    def s3_keys(self, bucket: str, prefix: str = "") -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, **_boto_credentials())
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process_tree(proc, extra_fragment=str(self.ray_tmp), sig=signal.SIGTERM)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    }
