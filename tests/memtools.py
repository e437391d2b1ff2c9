"""Helpers the memory tests share: the tools/ scripts as modules, and numpy's allocation peak."""
from __future__ import annotations

import importlib.util
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str) -> ModuleType:
    """``tools/<name>.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def traced_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated (numpy arrays included: numpy reports to tracemalloc) while ``fn`` runs,
    above what was allocated before. ``fn`` runs once first, so one-off caches are not counted."""
    fn()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
