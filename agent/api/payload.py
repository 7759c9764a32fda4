"""The heartbeat body: validated by hand, not by a DRF serializer (which costs more than all the rest of
this endpoint's work). Errors name the field, like the rest of the API: `{"fields": {name: [message]}}`.

    {
      "gpu_util": 37.0,            required; number 0..100, or null for "no reading" (never idleness)
      "gpus": [{"index": 0, "util": 37.0, "mem_used_mb": 1024, "mem_total_mb": 24576, "temp_c": 51}],
      "gpu_source": "nvml",        nvml | nvidia-smi | file | null
      "gpu_error": null,           why there is no reading
      "time": 1767000000.25,       when the agent took the reading (its clock, unix seconds)
      "state": "running",          running | preparing_hibernate | hibernate_ready
      "sync": {...} | null,        the sync service's report (JSON object, at most 4 KB)
      "agent_version": "1"
    }
"""

from __future__ import annotations

import json
from typing import Any

from dumont.core.errors import InvalidInput

STATES = ("running", "preparing_hibernate", "hibernate_ready")
MAX_GPUS = 64
MAX_SYNC_BYTES = 4096
MAX_TEXT = 500


def _invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", code="validation_error", data={"fields": {field: [message]}})


def _number(value: Any, field: str, *, low: float | None = None, high: float | None = None,
            nullable: bool = True) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(field, "must be a number" + (" or null" if nullable else ""))
    if (low is not None and value < low) or (high is not None and value > high):
        raise _invalid(field, f"must be within {low:g}..{high:g}" if high is not None else f"must be >= {low:g}")
    return float(value)


def _text(value: Any, field: str, limit: int = MAX_TEXT) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(field, "must be a string or null")
    return value[:limit]


def _gpus(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid("gpus", "must be a list")
    if len(value) > MAX_GPUS:
        raise _invalid("gpus", f"at most {MAX_GPUS} GPUs")
    gpus = []
    for i, gpu in enumerate(value):
        if not isinstance(gpu, dict):
            raise _invalid(f"gpus[{i}]", "must be an object")
        index = gpu.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise _invalid(f"gpus[{i}].index", "must be an integer >= 0")
        gpus.append({
            "index": index,
            "util": _number(gpu.get("util"), f"gpus[{i}].util", low=0, high=100),
            "mem_used_mb": _number(gpu.get("mem_used_mb"), f"gpus[{i}].mem_used_mb", low=0),
            "mem_total_mb": _number(gpu.get("mem_total_mb"), f"gpus[{i}].mem_total_mb", low=0),
            "temp_c": _number(gpu.get("temp_c"), f"gpus[{i}].temp_c", low=-100, high=200),
        })
    return gpus


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def heartbeat_parse(body: bytes) -> dict[str, Any]:
    """The validated heartbeat, or InvalidInput naming the first bad field."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("The body is not valid JSON.", code="parse_error") from None
    if not isinstance(data, dict):
        raise InvalidInput("The body must be a JSON object.", code="parse_error")
    if "gpu_util" not in data:
        raise _invalid("gpu_util", "this field is required (null when there is no reading)")
    state = data.get("state", "running")
    if state not in STATES:
        raise _invalid("state", f"must be one of {', '.join(STATES)}")
    sync = data.get("sync")
    if sync is not None:
        if not isinstance(sync, dict):
            raise _invalid("sync", "must be an object or null")
        if len(json.dumps(sync)) > MAX_SYNC_BYTES:
            raise _invalid("sync", f"at most {MAX_SYNC_BYTES} bytes")
    return {
        "gpu_util": _number(data["gpu_util"], "gpu_util", low=0, high=100),
        "gpus": _gpus(data.get("gpus")),
        "gpu_source": _text(data.get("gpu_source"), "gpu_source", 32),
        "gpu_error": _text(data.get("gpu_error"), "gpu_error"),
        "time": _number(data.get("time"), "time", low=0),
        "state": state,
        "sync": sync,
        "agent_version": _text(data.get("agent_version"), "agent_version", 32),
    }

