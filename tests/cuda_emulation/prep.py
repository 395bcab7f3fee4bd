"""Rewrites a posenc_fast .cu file into host C++ for the emulator (emu.h).

Usage: python prep.py SRC.cu > OUT.cpp

Three CUDA-only constructs are rewritten; everything else compiles as it is once
emu.h (force-included) has defined the CUDA qualifiers away:
* ``__shared__ T name[a][b];``  -> a reference to the block's buffer of race-checked
  elements, ``emu_shared<EmuShared<T>[a][b]>()``
* ``extern __shared__ T name[];`` -> a pointer to the block's dynamic shared memory
* ``kernel<...><<<grid, block, smem, stream>>>(args);`` -> ``emu_launch(grid, block, smem, [&] { kernel<...>(args); });``
* ``reinterpret_cast<T>(p)`` -> ``emu_reinterpret_cast<T>(p)``, which reports misaligned vector accesses
and every ``__global__`` function records its name (with template arguments) when it runs.
The script fails if any ``__shared__`` or ``<<<`` is left, so a construct it does not
understand cannot slip through unemulated.
"""

import re
import sys

STATIC_SHARED = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)((?:\[[^\]]+\])+)\s*;")
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\[\]\s*;")
LAUNCH = re.compile(r"([\w:]+(?:<[^;]*?>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S)
KERNEL_BODY = re.compile(r"__global__[^{;]*?\)\s*\{", re.S)


def _split_top_level(text: str):
    """Splits at commas outside brackets: "dim3(a, b), 256, 0, s" -> 4 parts."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{<"
        depth -= ch in ")]}>"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _launch(m: re.Match) -> str:
    kernel, config, args = m.group(1), _split_top_level(m.group(2)), m.group(3)
    grid, block = config[0], config[1]
    smem = config[2] if len(config) > 2 else "0"
    return f"emu_launch(dim3({grid}), dim3({block}), {smem}, [&] {{ {kernel}({args}); }});"


def rewrite(src: str) -> str:
    src = STATIC_SHARED.sub(lambda m: f"EmuShared<{m.group(1)}> (&{m.group(2)}){m.group(3)} = "
                                      f"*emu_shared<EmuShared<{m.group(1)}>{m.group(3)}>();", src)
    src = DYNAMIC_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = "
                                       f"reinterpret_cast<{m.group(1)}*>(emu_dyn_smem());", src)
    src = LAUNCH.sub(_launch, src)
    src = re.sub(r"\breinterpret_cast<", "emu_reinterpret_cast<", src)
    src = KERNEL_BODY.sub(lambda m: m.group(0) + " emu_note_kernel(__PRETTY_FUNCTION__);", src)
    for token in ("__shared__", "<<<"):
        if token in src:
            raise SystemExit(f"prep.py: unconverted CUDA construct {token!r} left")
    return src


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(rewrite(f.read()))
