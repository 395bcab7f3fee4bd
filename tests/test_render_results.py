"""tools/render_results.py: records -> markdown tables and a PNG plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "render_results.py"


def _records():
    base = dict(device="NVIDIA H200", commit="abc123", dtype="bfloat16", torch_version="2.11")
    return [
        dict(base, op="pyramid_pos_level_add", direction="fwd", workload="var-d16-b64", backend="cuda", ms=0.5,
             gbps=3000.0, pct_of_copy_bandwidth=91.0, speedup_vs_eager=3.2, speedup_vs_compile=1.4),
        dict(base, op="pyramid_pos_level_add", direction="fwd", workload="var-d16-b64", backend="cuda", ms=0.4,
             gbps=3600.0, pct_of_copy_bandwidth=95.0, speedup_vs_eager=4.0, speedup_vs_compile=1.6),
        dict(base, op="qkv_proj", direction="fwd", workload="var-d16-b32", backend="triton", ms=1.1, gemm_ms=1.0,
             speedup_vs_eager=1.9, speedup_vs_compile=1.3),
        dict(kind="host_overhead", device="x86_64", mode="stub", op="apply_rope", workload="n=1", eager_us=40.0,
             triton_us=12.5, cuda_us=9.0, commit="abc123"),
    ]


def test_tables_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in _records()) + "\n")
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    res = subprocess.run([sys.executable, str(TOOL), str(src), "--md", str(md), "--png", str(png)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = md.read_text()
    rows = [line for line in text.splitlines() if "pyramid_pos_level_add" in line]
    assert len(rows) == 1 and "0.4000" in rows[0] and "95 %" in rows[0]  # the newest record wins
    qkv = next(line for line in text.splitlines() if "qkv_proj" in line)
    assert "| 1.10 |" in qkv  # x bare GEMM
    assert "| 40.0 | 12.5 | 9.0 |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    res = subprocess.run([sys.executable, str(TOOL), str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "bad.jsonl:1" in res.stderr
    res = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "missing.jsonl")], capture_output=True, text=True)
    assert res.returncode != 0 and "no such file" in res.stderr
