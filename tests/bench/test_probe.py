"""The bench's machine probe: what it measures, and its one-line rendering."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# bench/ is not an installed package (the smoke test runs it as `python -m bench` from the
# repository); its probe uses the standard library only, so load that file by path.
_SPEC = importlib.util.spec_from_file_location(
    "bench_probe", Path(__file__).resolve().parents[2] / "bench" / "probe.py"
)
assert _SPEC is not None and _SPEC.loader is not None
_probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_probe)
probe, render = _probe.probe, _probe.render


def test_the_probe_measures_and_leaves_no_file(tmp_path: Path) -> None:
    p = probe(tmp_path, back_to_back=3, idle=1, idle_s=0.001)
    assert p["fdatasync_ms"]["back_to_back_p50"] > 0
    assert p["fdatasync_ms"]["after_idle_p50"] > 0
    assert p["syscall_us"] > 0 and p["python_ms"] > 0
    assert list(tmp_path.iterdir()) == []


def test_the_probe_refuses_zero_samples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        probe(tmp_path, back_to_back=0)
    with pytest.raises(ValueError, match="at least one sample"):
        probe(tmp_path, idle=0)


def test_render_with_and_without_an_end() -> None:
    start = {
        "fdatasync_ms": {"back_to_back_p50": 0.1, "after_idle_p50": 0.4, "idle_s": 0.05},
        "syscall_us": 0.2,
        "python_ms": 4.2,
    }
    end = {**start, "python_ms": 6.0}
    both = render(start, end)
    assert both.startswith("machine probe (start -> end): ")
    assert "python loop 4.2 -> 6.0 ms" in both and "after 50 ms idle" in both
    alone = render(start, None)
    assert alone.startswith("machine probe (start): ") and "->" not in alone
