"""The device part installs and runs with numpy + msgpack alone, and imports run one way
(docs/ARCHITECTURE.md): the contract imports neither host nor device; the device never imports the
host, nor torch outside its torch backend."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside a function (relative imports resolved
    against the package its folder maps to)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _violations(folder: str, banned: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        for mod in sorted(_imports(path)):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{rel} imports {mod}")
    return bad


def test_imports_run_one_way():
    # the contract: cli.py dispatches a subcommand to the part that does it, inside that subcommand
    assert _violations("stn_edge", ("stn_edge.host", "stn_edge.device"), ("stn_edge/cli.py",)) == []
    assert _violations("device", ("stn_edge.host",)) == []
    assert _violations("device", ("torch", "tensorly"), ("device/backends/torch.py",)) == []

SCRIPT = textwrap.dedent('''
    import sys, importlib.abc
    BLOCKED = ("torch", "tensorly", "onnx", "onnxruntime", "ai_edge_litert", "tflite_runtime", "tflite", "sklearn", "scipy")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from stn_edge.device import Runtime
    from stn_edge.errors import BackendUnavailable
    sys.path.insert(0, TESTS_DIR)
    from tiny import tiny_parts
    header, builder, arrays = tiny_parts()
    rt = Runtime.load(builder.to_bytes(header), mem_limit=None)
    assert rt.backend == "numpy", rt.backend
    y = rt.run({"x": arrays["x"]})["y"]
    np.testing.assert_allclose(y, arrays["y"], rtol=1e-5, atol=1e-6)
    rt.rescale(200)
    assert rt.plan.layers[0].rank == 1
    try:
        Runtime.load(builder.to_bytes(header), backend="onnxruntime")
    except BackendUnavailable as exc:
        assert "pip install 'stn-edge[onnxruntime]'" in str(exc), exc
    else:
        raise AssertionError("onnxruntime should be unavailable")
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("device-light ok")
''')


def test_runtime_runs_without_host_or_engines():
    res = subprocess.run([sys.executable, "-c", SCRIPT.replace("TESTS_DIR", repr(str(HERE)))], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "device-light ok" in res.stdout


def test_cli_inspect_without_host(tmp_path):
    sys.path.insert(0, str(HERE))
    from tiny import tiny_bytes

    path = tmp_path / "t.stn"
    path.write_bytes(tiny_bytes())
    code = textwrap.dedent(f'''
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "onnxruntime", "tensorly"):
                    raise ImportError(name)
        sys.meta_path.insert(0, Block())
        from stn_edge.cli import main
        sys.exit(main(["plan", {str(path)!r}, "--mem-limit", "50%"]))
    ''')
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "total" in res.stdout
