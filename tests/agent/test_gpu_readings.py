"""The daemon's GPU sources, each against a real program or file (a stand-in `nvidia-smi` script on
PATH prints what the real one prints on a 2-GPU machine). No GPU needed."""

import os
import stat

import pytest

from agent.daemon.dumont_agent import (
    NoSource,
    NvidiaSmiSource,
    UtilFileSource,
    detect_gpu_source,
    restic_snapshot_id,
    take_reading,
)


def fake_nvidia_smi(tmp_path, output: str, exit_code: int = 0) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\ncat <<'OUT'\n{output}OUT\nexit {exit_code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_nvidia_smi_per_gpu_figures_and_the_max_over_gpus(tmp_path):
    source = NvidiaSmiSource(fake_nvidia_smi(tmp_path, "0, 3, 1200, 81559, 34\n1, 97, 70000, 81559, 71\n"))
    reading = take_reading(source)
    assert reading["gpu_util"] == 97.0 and reading["gpu_error"] is None and reading["gpu_source"] == "nvidia-smi"
    assert reading["gpus"][0] == {"index": 0, "util": 3.0, "mem_used_mb": 1200.0, "mem_total_mb": 81559.0,
                                  "temp_c": 34.0}


def test_a_gpu_without_utilization_makes_the_whole_reading_missing(tmp_path):
    # the idle GPU 0 must not stand for the machine while GPU 1 cannot say how busy it is
    source = NvidiaSmiSource(fake_nvidia_smi(tmp_path, "0, 0, 10, 81559, 30\n1, [N/A], 10, 81559, [N/A]\n"))
    reading = take_reading(source)
    assert reading["gpu_util"] is None and "GPU 1" in reading["gpu_error"]
    assert reading["gpus"][1]["temp_c"] is None


@pytest.mark.parametrize(("output", "exit_code", "error"), [
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9, "exited 9"),
    ("garbage without commas\n", 0, "unexpected nvidia-smi line"),
    ("", 0, "no GPU found"),
])
def test_a_failing_nvidia_smi_is_a_missing_reading_not_zero(tmp_path, output, exit_code, error):
    reading = take_reading(NvidiaSmiSource(fake_nvidia_smi(tmp_path, output, exit_code)))
    assert reading["gpu_util"] is None and error in reading["gpu_error"]


def test_the_simulated_file_source(tmp_path):
    path = tmp_path / "gpu_util"
    path.write_text("12.5\n")
    assert take_reading(UtilFileSource(str(path)))["gpu_util"] == 12.5
    for bad in ("", "-1", "101", "nan", "zero"):
        path.write_text(bad)
        assert take_reading(UtilFileSource(str(path)))["gpu_util"] is None, bad
    path.unlink()
    assert "cannot read" in take_reading(UtilFileSource(str(path)))["gpu_error"]


def test_source_detection(tmp_path, monkeypatch):
    smi = fake_nvidia_smi(tmp_path, "0, 1, 1, 1, 1\n")
    monkeypatch.setenv("PATH", f"{os.path.dirname(smi)}:/usr/bin:/bin")
    monkeypatch.setenv("DUMONT_GPU_UTIL_FILE", str(tmp_path / "gpu_util"))
    assert isinstance(detect_gpu_source(), UtilFileSource)  # a simulated machine says so explicitly
    assert isinstance(detect_gpu_source("nvidia-smi"), NvidiaSmiSource)
    monkeypatch.delenv("DUMONT_GPU_UTIL_FILE")
    assert isinstance(detect_gpu_source(), NvidiaSmiSource)  # no pynvml in this environment
    monkeypatch.setenv("PATH", "/nonexistent")
    source = detect_gpu_source()
    assert isinstance(source, NoSource) and take_reading(source)["gpu_util"] is None


def test_restic_snapshot_id_comes_only_from_the_summary_message():
    assert restic_snapshot_id('{"message_type":"summary","snapshot_id":"5f3c9a1e","files_new":1}') == "5f3c9a1e"
    assert restic_snapshot_id('{"message_type":"status","percent_done":0.4}') is None
    assert restic_snapshot_id("Fatal: repository does not exist") is None
    assert restic_snapshot_id("{broken json") is None


# ---- NVML, against what an H200 answered (driver 580.159.04, nvidia-ml-py 13.615.71, a bf16 matmul
# running; a check on the lent GPU machine, 2026-11-29) ----------------------------------------------


class _H200Nvml:
    """The pynvml calls the agent makes, answering the recorded values. `versioned`: a binding whose
    nvmlDeviceGetMemoryInfo takes `version` (nvidia-ml-py >= 11.510)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    class _Memory:
        def __init__(self, **values):
            self.__dict__.update(values)

    nvmlMemory_v2 = 0x02000028  # what nvidia-ml-py defines (the v2 answer's version field read 33554472)

    def __init__(self, *, versioned: bool = True):
        self.versioned = versioned

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return object()

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self._Memory(gpu=100, memory=40)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 56

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        if version is not None and not self.versioned:
            raise TypeError("nvmlDeviceGetMemoryInfo() got an unexpected keyword argument 'version'")
        if version is None:  # v1: the driver's reserved 615 MB counted as used
            return self._Memory(total=150754820096, free=149049966592, used=1704853504)
        return self._Memory(version=33554472, total=150754820096, reserved=644939776, free=149049966592,
                            used=1059913728)


def test_nvml_memory_in_use_is_what_nvidia_smi_says_not_the_drivers_reserve():
    from agent.daemon.dumont_agent import NvmlSource

    reading = take_reading(NvmlSource(_H200Nvml()))
    assert reading["gpu_util"] == 100.0 and reading["gpu_source"] == "nvml" and reading["gpu_error"] is None
    gpu = reading["gpus"][0]
    assert round(gpu["mem_used_mb"]) == 1011  # nvidia-smi printed 1011 at that moment; NVML v1 says 1626
    assert gpu["mem_total_mb"] == 143771.0 and gpu["temp_c"] == 56.0


def test_an_older_nvml_binding_falls_back_to_the_first_memory_call():
    from agent.daemon.dumont_agent import NvmlSource

    gpu = take_reading(NvmlSource(_H200Nvml(versioned=False)))["gpus"][0]
    assert round(gpu["mem_used_mb"]) == 1626 and gpu["util"] == 100.0
