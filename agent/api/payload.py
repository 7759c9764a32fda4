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
import math
import time
from typing import Any

from dumont.core.errors import InvalidInput

STATES = ("running", "preparing_hibernate", "hibernate_ready")
MAX_GPUS = 64
MAX_GPU_MEMORY_MB = 16 * 1024 * 1024  # 16 TB: beyond any GPU
# the agent's reading time: its clock may be off, but not by a day
MAX_TIME_SKEW_SECONDS = 24 * 3600
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
    try:
        number = float(value)  # a 400-digit integer overflows here
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
        raise _invalid(field, f"must be a finite number within {low:.10g}..{high:.10g}" if high is not None
                       else "must be a finite number" + (f" >= {low:.10g}" if low is not None else ""))
    return number


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
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_GPUS:
            raise _invalid(f"gpus[{i}].index", f"must be an integer within 0..{MAX_GPUS - 1}")
        total = _number(gpu.get("mem_total_mb"), f"gpus[{i}].mem_total_mb", low=0, high=MAX_GPU_MEMORY_MB)
        gpus.append({
            "index": index,
            "util": _number(gpu.get("util"), f"gpus[{i}].util", low=0, high=100),
            "mem_used_mb": _number(gpu.get("mem_used_mb"), f"gpus[{i}].mem_used_mb", low=0,
                                   high=MAX_GPU_MEMORY_MB if total is None else total),
            "mem_total_mb": total,
            "temp_c": _number(gpu.get("temp_c"), f"gpus[{i}].temp_c", low=-100, high=200),
        })
    return gpus


def _constant(name: str) -> float:
    """NaN and Infinity (not JSON, but Python's json reads them): kept, to be refused naming their field."""
    return float(name)


def heartbeat_parse(body: bytes) -> dict[str, Any]:
    """The validated heartbeat, or InvalidInput naming the first bad field."""
    try:
        # 1e999 reads as infinity without parse_constant: every number is checked for finiteness below
        data = json.loads(body, parse_constant=_constant)
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
        try:
            size = len(json.dumps(sync, allow_nan=False))  # PostgreSQL's jsonb refuses NaN and Infinity
        except ValueError:
            raise _invalid("sync", "numbers must be finite") from None
        if size > MAX_SYNC_BYTES:
            raise _invalid("sync", f"at most {MAX_SYNC_BYTES} bytes")
    now = time.time()
    return {
        "gpu_util": _number(data["gpu_util"], "gpu_util", low=0, high=100),
        "gpus": _gpus(data.get("gpus")),
        "gpu_source": _text(data.get("gpu_source"), "gpu_source", 32),
        "gpu_error": _text(data.get("gpu_error"), "gpu_error"),
        "time": _number(data.get("time"), "time", low=now - MAX_TIME_SKEW_SECONDS, high=now + MAX_TIME_SKEW_SECONDS),
        "state": state,
        "sync": sync,
        "agent_version": _text(data.get("agent_version"), "agent_version", 32),
    }

