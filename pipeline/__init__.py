"""Stable-SAM's DVC stages: one module per stage, wired in ``dvc.yaml``.

Importing this package (every ``python -m pipeline.<stage>`` does) turns off the telemetry of
MLflow, DVC and Ray, so that ``dvc repro`` run by hand behaves like ``make repro``: the stages
work offline and report nothing. A value already in the environment wins.
"""

import os

OFFLINE_ENVIRONMENT = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "ITERATIVE_DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}

for _key, _value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(_key, _value)
