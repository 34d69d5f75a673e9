"""What the annotator stages write: their results without wall times.

Wall times go to MLflow and the log, not into a DVC output, so a rerun on the same inputs writes
the same bytes and leaves git clean.
"""

from __future__ import annotations

from typing import Any

__all__ = ["without_seconds"]


def without_seconds(content: Any) -> Any:
    """``content`` (nested dicts) without its ``seconds`` entries."""
    if isinstance(content, dict):
        return {k: without_seconds(v) for k, v in content.items() if k != "seconds"}
    return content
