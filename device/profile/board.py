"""Probes of the machine: this process's peak resident memory, CPU and engine versions, a Jetson's power mode,
clocks and temperatures (``nvpmodel``, ``tegrastats``, ``jtop``). Whatever is absent is recorded as None."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence




def _proc_status() -> dict[str, int]:
    try:
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM") if k in fields}
    except OSError:
        return {}


def reset_peak_memory() -> bool:
    """Reset the process's peak resident memory to the current one (Linux >= 4.0); False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory() -> int | None:
    """Peak resident memory of this process in bytes (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    try:
        import resource
    except ImportError:
        return None
    scale = 1 if platform.system() == "Darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _run_text(argv: Sequence[str], timeout: float = 5.0) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def tegrastats_sample(interval_ms: int = 200, timeout: float = 5.0) -> str | None:
    """One line of ``tegrastats --interval``: RAM, CPU/GPU load and clocks, temperatures, power rails."""
    if shutil.which("tegrastats") is None:
        return None
    try:
        proc = subprocess.Popen(["tegrastats", "--interval", str(interval_ms)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None
    try:
        deadline = time.monotonic() + timeout
        line = ""
        while not line.strip() and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline() if proc.stdout else ""
        return line.strip() or None
    finally:
        proc.kill()
        proc.wait()


def parse_tegrastats(line: str) -> dict[str, Any]:
    """Temperatures (``name@41.5C``), GPU clock share (``GR3D_FREQ 0%@[1300]``) and EMC from a tegrastats line."""
    temps = {k: float(v) for k, v in re.findall(r"(\w+)@(-?[\d.]+)C\b", line)}
    gpu = re.search(r"GR3D_FREQ (\d+)%(?:@\[?(\d+)\]?)?", line)
    emc = re.search(r"EMC_FREQ (\d+)%(?:@(\d+))?", line)
    return {
        "temperatures_c": temps,
        "gpu_load_percent": int(gpu.group(1)) if gpu else None,
        "gpu_mhz": int(gpu.group(2)) if gpu and gpu.group(2) else None,
        "emc_load_percent": int(emc.group(1)) if emc else None,
    }


def _jtop_snapshot() -> dict[str, Any] | None:
    try:
        from jtop import jtop  # jetson-stats
    except ImportError:
        return None
    try:
        with jtop() as jetson:
            if not jetson.ok():
                return None
            stats = {k: (v if isinstance(v, (int, float, str)) or v is None else str(v)) for k, v in jetson.stats.items()}
            return {"stats": stats, "nvpmodel": str(getattr(jetson, "nvpmodel", "")) or None}
    except Exception as exc:  # jtop talks to a service that may not run
        return {"error": f"{type(exc).__name__}: {exc}"}


def jetson_info(root: str | os.PathLike = "/") -> dict[str, Any] | None:
    """Power mode, clocks and temperatures of an NVIDIA Jetson; None on any other machine.

    ``root`` lets tests point at a fake tree (the commands are only run for the real root).
    """
    base = Path(root)
    release = None
    try:
        release = (base / "etc/nv_tegra_release").read_text(errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        pass
    try:
        model = (base / "proc/device-tree/model").read_text(errors="replace").strip("\x00 \n")
    except OSError:
        model = None
    if release is None and not (model and ("jetson" in model.lower() or "tegra" in model.lower())):
        return None
    real = base.resolve() == Path("/").resolve()
    sample = tegrastats_sample() if real else None
    return {
        "model": model,
        "l4t_release": release,
        "nvpmodel": _run_text(["nvpmodel", "-q"]) if real else None,
        "tegrastats": sample,
        "tegrastats_parsed": parse_tegrastats(sample) if sample else None,
        "jtop": _jtop_snapshot() if real else None,
    }


def system_info() -> dict[str, Any]:
    """The machine a profile ran on: CPU, cores usable, memory, engine versions, Jetson state."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    cpu_model = None
    try:
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith(("model name", "Model"))), None)
    except OSError:
        pass
    versions = {}
    for module in ("numpy", "onnxruntime", "ai_edge_litert", "torch"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = None
    try:
        mem_total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        mem_total = None
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_model, "cpus_usable": cpus,
            "memory_bytes": mem_total, "load_average": load, "python": platform.python_version(),
            "versions": versions, "jetson": jetson_info()}
