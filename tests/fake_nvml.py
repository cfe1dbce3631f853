"""A stand-in for the pynvml module, for the GPU panel on machines without a GPU.

Backed by a real run: the same panel was driven with the real pynvml on an H100 (see the closing note
of the TUI issue). Values are fixed so screenshots are stable.
"""

from types import SimpleNamespace

from engine.telemetry import HostSnapshot

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2


class NVMLError(Exception):
    pass


GPUS = [
    dict(name="NVIDIA H100 80GB HBM3", util=87, used=61_000, total=81_559, temp=64, power=512_000, limit=700_000,
         sm=1980, mem=2619, procs=[SimpleNamespace(pid=99_999_999, usedGpuMemory=60_000 * 2**20)]),
    dict(name="NVIDIA H100 80GB HBM3", util=99, used=15_800, total=81_559, temp=71, power=655_000, limit=700_000,
         sm=1755, mem=2619, procs=[]),
]


def nvmlInit():
    return None


def nvmlDeviceGetCount():
    return len(GPUS)


def nvmlDeviceGetHandleByIndex(i):
    return GPUS[i]


def nvmlDeviceGetName(h):
    return h["name"]


def nvmlDeviceGetMemoryInfo(h):
    return SimpleNamespace(used=h["used"] * 2**20, total=h["total"] * 2**20)


def nvmlDeviceGetUtilizationRates(h):
    return SimpleNamespace(gpu=h["util"], memory=40)


def nvmlDeviceGetTemperature(h, _kind):
    return h["temp"]


def nvmlDeviceGetPowerUsage(h):
    return h["power"]


def nvmlDeviceGetEnforcedPowerLimit(h):
    return h["limit"]


def nvmlDeviceGetFanSpeed(h):
    raise NVMLError("Not Supported")  # datacenter GPUs have no fan reading: must show n/a, not crash


def nvmlDeviceGetClockInfo(h, kind):
    return h["sm"] if kind == NVML_CLOCK_SM else h["mem"]


def nvmlDeviceGetComputeRunningProcesses(h):
    return h["procs"]


class NoDriver:
    """pynvml on a machine without the NVIDIA driver."""

    @staticmethod
    def nvmlInit():
        raise NVMLError("NVML Shared Library Not Found")


def fixed_host() -> HostSnapshot:
    return HostSnapshot(cpu_percent=12.0, ram_used_gb=6.2, ram_total_gb=23.5)
