"""bench/gpu_suite.sh, the one-command GPU check, cannot rot between GPU sessions:
its plumbing runs here in dry-run mode (every step, each cut to a plumbing check),
within the file and budget limits of the lent machine."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
EXPECTED = {"env.txt", "log.txt", "results.jsonl", "tests.log", "ncu.csv", "sanitizer.log"}


def _run(out: Path, *args, timeout=900):
    return subprocess.run(["bash", str(SUITE), str(out), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_dry_run_runs_every_step_and_fits_the_lease(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "out"
    res = _run(out, "main", "--dry-run", "--budget", "600")
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + log
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert files == EXPECTED, files
    assert len(files) <= 8  # what the device tool brings back
    for name in ("bench-headline", "host-overhead", "tests", "ncu", "sanitizer"):
        assert f"END {name} rc=0" in log, log
    assert "SKIP" not in log
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert records and all(r["kind"] == "host_overhead" for r in records)
    for r in records:
        assert r["commit"] and r["torch_version"] and r["device"], r
        assert r["eager_us"] > 0 and r["triton_us"] > 0 and r["cuda_us"] > 0, r
    assert "tests collected" in (out / "tests.log").read_text()
    assert "ran every op" in (out / "ncu.csv").read_text()


def test_budget_exhausted_steps_are_skipped_cleanly(tmp_path):
    out = tmp_path / "out"
    res = _run(out, "main", "--dry-run", "--budget", "0", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    log = (out / "log.txt").read_text()
    for name in ("bench-headline", "host-overhead", "tests"):
        assert f"SKIP {name}" in log, log
    assert (out / "env.txt").read_text().startswith("commit ")


def test_bad_arguments_are_refused(tmp_path):
    res = _run(tmp_path / "out", "everything", timeout=60)
    assert res.returncode == 2 and "unknown argument" in res.stderr
