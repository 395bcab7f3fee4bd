"""Renders benchmark records (bench/results/*.jsonl) as a markdown table and a PNG plot.

Per op, direction and workload, the newest record of each backend: ms, GB/s, % of
the copy bandwidth measured in the same run, x eager, x torch.compile (and, for
qkv_proj, x the bare GEMM); host-overhead records (bench/host_overhead.py) get a
table of microseconds per call beside eager. The plot shows, per op, the fused
backends' % of copy bandwidth (or x bare GEMM for qkv_proj) and their speed-up
over eager and torch.compile.

    python tools/render_results.py bench/results/*.jsonl [--md OUT.md] [--png OUT.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def load(paths: Sequence[Path]) -> List[dict]:
    records = []
    for path in paths:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{i}: not a JSON record ({exc})")
    return records


def _latest(records: List[dict], key) -> List[dict]:
    """The newest record per key (records append in time order)."""
    out: Dict[tuple, dict] = {}
    for r in records:
        out[key(r)] = r
    return list(out.values())


def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def kernel_table(records: List[dict]) -> str:
    ops = [r for r in records if "ms" in r and "op" in r]
    if not ops:
        return ""
    rows = _latest(ops, lambda r: (r["device"], r["op"], r["direction"], r["workload"], r["dtype"], r["backend"]))
    rows.sort(key=lambda r: (r["device"], r["op"], r["direction"], r["workload"], r["backend"]))
    lines = ["| device | op | dir | workload | dtype | backend | ms | GB/s | % copy BW | x eager | x compile "
             "| x bare GEMM | commit |", "|" + "---|" * 13]
    for r in rows:
        gemm = r.get("gemm_ms")
        lines.append("| " + " | ".join([
            r["device"], r["op"], r["direction"], r["workload"], r["dtype"], r["backend"], _fmt(r["ms"], ".4f"),
            _fmt(r.get("gbps"), ".0f"), _fmt(r.get("pct_of_copy_bandwidth"), ".0f", " %"),
            _fmt(r.get("speedup_vs_eager"), ".2f"), _fmt(r.get("speedup_vs_compile"), ".2f"),
            _fmt(r["ms"] / gemm if gemm else None, ".2f"), str(r.get("commit", ""))]) + " |")
    return "\n".join(lines)


def host_table(records: List[dict]) -> str:
    host = [r for r in records if r.get("kind") == "host_overhead"]
    if not host:
        return ""
    rows = _latest(host, lambda r: (r["device"], r["mode"], r["op"], r["workload"]))
    lines = ["| device | mode | op | workload | eager us | triton us | cuda us | commit |", "|" + "---|" * 8]
    for r in rows:
        lines.append("| " + " | ".join([
            r["device"], r["mode"], r["op"], r["workload"], _fmt(r["eager_us"], ".1f"),
            _fmt(r["triton_us"], ".1f"), _fmt(r["cuda_us"], ".1f"), str(r.get("commit", ""))]) + " |")
    return "\n".join(lines)


def plot(records: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = _latest([r for r in records if "ms" in r and "op" in r and r["backend"] in ("cuda", "triton")],
                  lambda r: (r["op"], r["direction"], r["workload"], r["backend"]))
    host = _latest([r for r in records if r.get("kind") == "host_overhead"], lambda r: (r["op"], r["workload"]))
    fig, axes = plt.subplots(1, 3, figsize=(18, max(3.0, 0.35 * max(len(ops), len(host), 1) + 1.5)))
    labels = [f"{r['op']} {r['direction']} {r['workload']} [{r['backend']}]" for r in ops]
    y = list(range(len(ops)))
    eff = [(100 * r["gemm_ms"] / r["ms"]) if r.get("gemm_ms") else (r.get("pct_of_copy_bandwidth") or 0)
           for r in ops]
    axes[0].barh(y, eff, color="tab:blue")
    axes[0].set_title("% of copy bandwidth (qkv_proj: bare GEMM time / op time, %)")
    axes[1].barh([v - 0.2 for v in y], [r.get("speedup_vs_eager") or 0 for r in ops], height=0.4, label="x eager")
    axes[1].barh([v + 0.2 for v in y], [r.get("speedup_vs_compile") or 0 for r in ops], height=0.4,
                 label="x torch.compile")
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].legend()
    axes[1].set_title("speed-up")
    for ax in axes[:2]:
        ax.set_yticks(y)
        ax.set_yticklabels(labels if ax is axes[0] else [""] * len(y), fontsize=7)
        ax.invert_yaxis()
    hy = list(range(len(host)))
    for off, key, name in ((-0.27, "eager_us", "eager"), (0.0, "triton_us", "triton"), (0.27, "cuda_us", "cuda")):
        axes[2].barh([v + off for v in hy], [r[key] for r in host], height=0.27, label=name)
    axes[2].set_yticks(hy)
    axes[2].set_yticklabels([f"{r['op']}: {r['workload']}" for r in host], fontsize=7)
    axes[2].invert_yaxis()
    axes[2].set_title("host us per call")
    axes[2].legend()
    devices = sorted({str(r.get("device", "?")) for r in records})
    fig.suptitle("posenc_fast benchmarks: " + ", ".join(devices))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--md", type=Path, help="write the markdown here (default: stdout)")
    p.add_argument("--png", type=Path, help="write the plot here (needs matplotlib)")
    args = p.parse_args(argv)
    missing = [f for f in args.files if not f.is_file()]
    if missing:
        p.error(f"no such file: {', '.join(map(str, missing))}")
    records = load(args.files)
    md = "\n\n".join(t for t in (kernel_table(records), host_table(records)) if t) or "(no records)"
    if args.md:
        args.md.write_text(md + "\n")
    else:
        print(md)
    if args.png:
        plot(records, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
