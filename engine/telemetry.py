"""GPU and host telemetry through NVML (nvidia-ml-py), wrapped once.

Like nvitop's Device: every read returns None when the value is not available instead of raising, so a
missing driver, a GPU without fans or a process that vanished between two calls never reaches the UI
as an exception. NVML sees every GPU whatever CUDA_VISIBLE_DEVICES says, which is what a panel of the
whole box needs. Calls block for milliseconds: poll from a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GpuProcess:
    pid: int
    name: str
    memory_mb: float | None


@dataclass
class GpuSnapshot:
    index: int
    name: str
    utilization: float | None = None  # percent
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    fan_percent: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass
class HostSnapshot:
    cpu_percent: float
    ram_used_gb: float
    ram_total_gb: float


@dataclass
class Snapshot:
    gpus: list[GpuSnapshot]
    host: HostSnapshot
    note: str  # why there are no GPUs, when there are none
    time: float = field(default_factory=time.time)


def _na(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # NVML raises NVMLError subclasses, and ctypes errors when the driver is odd
        return None


def _process_name(pid: int) -> str:
    try:
        import psutil

        return " ".join(psutil.Process(pid).cmdline()[:3]) or psutil.Process(pid).name()
    except Exception:
        return "?"


class Telemetry:
    def __init__(self, nvml: Any = None, host_reader: Callable[[], HostSnapshot] | None = None):
        """`nvml` is the pynvml module; tests on machines without a GPU pass a stand-in (and a fixed
        host reader, so screenshots do not depend on this machine's load)."""
        self.nvml = nvml
        self.host_reader = host_reader or host
        self.note = ""
        if self.nvml is None:
            try:
                import pynvml

                self.nvml = pynvml
            except ImportError:
                self.note = "nvidia-ml-py is not installed"
        self.count = 0
        if self.nvml is not None:
            try:
                self.nvml.nvmlInit()
                self.count = self.nvml.nvmlDeviceGetCount()
                if self.count == 0:
                    self.note = "NVML found no NVIDIA GPU"
            except Exception as e:
                self.note = f"the NVIDIA driver could not be reached ({type(e).__name__})"
                self.nvml = None

    def gpu(self, index: int) -> GpuSnapshot:
        n = self.nvml
        h = n.nvmlDeviceGetHandleByIndex(index)
        name = _na(lambda: n.nvmlDeviceGetName(h))
        if isinstance(name, bytes):
            name = name.decode()
        mem = _na(lambda: n.nvmlDeviceGetMemoryInfo(h))
        power = _na(lambda: n.nvmlDeviceGetPowerUsage(h))
        limit = _na(lambda: n.nvmlDeviceGetEnforcedPowerLimit(h))
        util = _na(lambda: n.nvmlDeviceGetUtilizationRates(h))
        procs = []
        for p in (_na(lambda: n.nvmlDeviceGetComputeRunningProcesses(h)) or []):
            used = getattr(p, "usedGpuMemory", None)
            procs.append(GpuProcess(p.pid, _process_name(p.pid), used / 2**20 if isinstance(used, int) else None))
        return GpuSnapshot(
            index=index, name=name or f"GPU {index}",
            utilization=float(util.gpu) if util is not None else None,
            memory_used_mb=mem.used / 2**20 if mem is not None else None,
            memory_total_mb=mem.total / 2**20 if mem is not None else None,
            temperature_c=_na(lambda: float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))),
            power_w=power / 1000 if power is not None else None,
            power_limit_w=limit / 1000 if limit is not None else None,
            fan_percent=_na(lambda: float(n.nvmlDeviceGetFanSpeed(h))),
            sm_clock_mhz=_na(lambda: float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))),
            mem_clock_mhz=_na(lambda: float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM))),
            processes=procs,
        )

    def snapshot(self) -> Snapshot:
        gpus = []
        for i in range(self.count):
            snap = _na(lambda i=i: self.gpu(i))
            gpus.append(snap if snap is not None else GpuSnapshot(i, f"GPU {i} (unreadable)"))
        return Snapshot(gpus, self.host_reader(), self.note)


def host() -> HostSnapshot:
    import psutil

    vm = psutil.virtual_memory()
    return HostSnapshot(psutil.cpu_percent(interval=None), vm.used / 2**30, vm.total / 2**30)


def gpu_count(nvml: Any = None) -> int:
    """How many NVIDIA GPUs this machine has; 0 when there are none or NVML cannot tell."""
    return Telemetry(nvml).count
