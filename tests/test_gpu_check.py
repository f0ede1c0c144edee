"""tools/gpu_check.py's dry run at tiny shapes on the CPU, so that the check a lent GPU runs cannot rot: every
check and figure runs and passes, the reports are written, and nothing it imports needs decord or PyAV
(absent on the bare GPU machine)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_passes_and_writes_its_reports(tmp_path, monkeypatch):
    for absent in ("decord", "av"):  # as on the GPU machine: importing them fails
        monkeypatch.setitem(sys.modules, absent, None)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "tools/gpu_check.py"), run_name="__main__")
    report = json.loads((tmp_path / "report.json").read_text())
    names = [item.get("check") or item.get("figure") for item in report["results"]]
    assert names == ["flex", "bf16", "fsdp2", "step", "memory", "rollout"]
    assert [item["status"] for item in report["results"]] == ["ok"] * 6, report["results"]
    assert done.value.code == 0 and report["tiny"]
    step = next(item for item in report["results"] if item.get("figure") == "step")["values"]
    if (ROOT.parent / "shared/bench/yardstick.py").exists():  # beside a bare clone it is absent, and said so
        assert any(key.startswith("step / yardstick best") for key in step)
    else:
        assert step["yardstick"] == "absent"
    assert "| rollout | ok |" in (tmp_path / "report.md").read_text()
