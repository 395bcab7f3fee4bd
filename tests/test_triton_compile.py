"""Every Triton kernel variant the ops launch compiles for sm_80 and sm_90 (to a
cubin, on the CPU), specialised as the JIT specialises it on a GPU, with every
autotune config of the qkv_proj GEMM, and fits the target's shared memory. The
interpreter tests check the numbers; this checks what only the real compiler sees
(tools/triton_aot_check.py).

Cost: each distinct specialisation compiles once per target, into a Triton cache
kept across runs (keyed by Triton on the kernel source, options and compiler
version, so an edited kernel always recompiles): a few CPU-minutes on a fresh
machine, seconds after. A timed-out run kills the tool's whole process group."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "triton_aot_check.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _cache_dir() -> Path:
    import triton

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "posenc_fast" / f"triton-aot-{triton.__version__}"


def _run(args, interpret: bool, timeout: int, cache: Path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9's notice
    proc = subprocess.Popen([sys.executable, str(TOOL), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the tool and its compile workers
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_every_triton_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    launches = tmp_path / "launches.json"
    rec = _run(["record", str(launches)], interpret=True, timeout=600, cache=tmp_path / "cache")
    assert rec.returncode == 0, rec.stdout + rec.stderr
    recorded = json.loads(launches.read_text())
    kernels = {(e["module"].rsplit(".", 1)[-1], e["kernel"]) for e in recorded}
    # every kernel of every op was reached by the driver
    assert kernels == {("pyramid_pos_level_add", "_fwd_kernel"), ("pyramid_pos_level_add", "_bwd_rows_kernel"),
                       ("pyramid_pos_level_add", "_bwd_levels_kernel"), ("rope", "_rope_kernel"),
                       ("qkv_proj", "_fwd_kernel"), ("qkv_proj", "_bwd_kernel"),
                       ("pos_embed_add", "_fwd_kernel"), ("pos_embed_add", "_grid_fwd_kernel"),
                       ("pos_embed_add", "_bwd_tokens_kernel"), ("pos_embed_add", "_bwd_table_kernel")}, kernels
    comp = _run(["compile", str(launches), "--arch", "80", "--arch", "90"], interpret=False, timeout=3000,
                cache=_cache_dir())
    assert comp.returncode == 0, comp.stdout[-20000:] + comp.stderr[-5000:]
    assert "FAILED" not in comp.stdout


def test_recorded_launches_carry_the_jit_specialisation(tmp_path):
    """Unit strides fold into constants and aligned pointers carry 16-byte
    divisibility, as on a GPU: what compiles here is the vectorised kernel."""
    launches = tmp_path / "launches.json"
    rec = _run(["record", str(launches)], interpret=True, timeout=600, cache=tmp_path / "cache")
    assert rec.returncode == 0, rec.stdout + rec.stderr
    entries = json.loads(launches.read_text())
    rope = [e for e in entries if e["kernel"] == "_rope_kernel"]
    names = list(rope[0]["signature"])
    assert rope[0]["signature"]["sqd"] == "constexpr"  # contiguous head dim: stride 1
    assert [names.index("sqd")] in [p for p, _ in rope[0]["constexprs"]]
    assert [[0], [["tt.divisibility", 16]]] in rope[0]["attrs"]  # q pointer 16-byte aligned
