"""Every Triton kernel variant the ops launch compiles for sm_80 and sm_90 (to a
cubin, on the CPU), with every autotune config of the qkv_proj GEMM, and fits the
target's shared memory. The interpreter tests check the numbers; this checks
what only the real compiler sees (tools/triton_aot_check.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "triton_aot_check.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run(args, interpret: bool, timeout: int, cache: Path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)  # a fresh cache: every variant really compiles
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9's notice
    return subprocess.run([sys.executable, str(TOOL), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_every_triton_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    launches = tmp_path / "launches.json"
    rec = _run(["record", str(launches)], interpret=True, timeout=600, cache=tmp_path / "cache")
    assert rec.returncode == 0, rec.stdout + rec.stderr
    recorded = json.loads(launches.read_text())
    kernels = {(e["module"].rsplit(".", 1)[-1], e["kernel"]) for e in recorded}
    # every kernel of every op was reached by the driver
    assert kernels == {("pyramid_pos_level_add", "_fwd_kernel"), ("pyramid_pos_level_add", "_bwd_rows_kernel"),
                       ("pyramid_pos_level_add", "_bwd_levels_kernel"), ("rope", "_rope_kernel"),
                       ("qkv_proj", "_fwd_kernel"), ("qkv_proj", "_bwd_kernel")}, kernels
    comp = _run(["compile", str(launches), "--arch", "80", "--arch", "90"], interpret=False, timeout=3000,
                cache=tmp_path / "cache")
    assert comp.returncode == 0, comp.stdout[-20000:] + comp.stderr[-5000:]
    assert "FAILED" not in comp.stdout
