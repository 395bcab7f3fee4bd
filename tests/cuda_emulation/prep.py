"""Rewrites a posenc_fast .cu file into host C++ for the emulator (emu.h).

Usage: python prep.py SRC.cu > OUT.cpp

The project headers SRC.cu includes with quotes (device_utils.cuh ...: found next to
the including file or in SRC.cu's directory, csrc/) are inlined, recursively and once
each, and rewritten like SRC.cu, so device code kept in a header is emulated and
checked all the same. The public API headers (csrc/include/, found through the
build's -I csrc/include) stay #includes: the bindings compile them unrewritten as
plain C++, so they must hold nothing to rewrite, and the script checks that they don't.

Four CUDA-only constructs are rewritten; everything else compiles as it is once
emu.h (force-included) has defined the CUDA qualifiers away:
* ``__shared__ T name[a][b];``  -> a reference to the block's buffer of race-checked
  elements, ``emu_shared<EmuShared<T>[a][b]>()``
* ``extern __shared__ T name[];`` -> a pointer to the block's dynamic shared memory
* ``kernel<...><<<grid, block, smem, stream>>>(args);`` -> ``emu_launch(grid, block, smem, [&] { kernel<...>(args); });``
* ``reinterpret_cast<T>(p)`` -> ``emu_reinterpret_cast<T>(p)``, which reports misaligned vector accesses
and every ``__global__`` function records its name (with template arguments) when it runs.
The script fails if any ``__shared__`` or ``<<<`` is left in a file, so a construct it
does not understand cannot slip through unemulated. ``#line`` markers keep compiler
and sanitizer reports pointing at the original files.
"""

import re
import sys
from pathlib import Path
from typing import List, Tuple

STATIC_SHARED = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)((?:\[[^\]]+\])+)\s*;")
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\[\]\s*;")
LAUNCH = re.compile(r"([\w:]+(?:<[^;]*?>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S)
KERNEL_BODY = re.compile(r"__global__[^{;]*?\)\s*\{", re.S)
QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*$', re.M)
PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[^\n]*$", re.M)


class PrepError(Exception):
    pass


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


def _keep_lines(replace):
    """The replacement followed by the line breaks it dropped (the #line markers stay true)."""
    return lambda m: (r := replace(m)) + "\n" * (m.group(0).count("\n") - r.count("\n"))


def rewrite(src: str, name: str = "<source>") -> str:
    src = STATIC_SHARED.sub(lambda m: f"EmuShared<{m.group(1)}> (&{m.group(2)}){m.group(3)} = "
                                      f"*emu_shared<EmuShared<{m.group(1)}>{m.group(3)}>();", src)
    src = DYNAMIC_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = "
                                       f"reinterpret_cast<{m.group(1)}*>(emu_dyn_smem());", src)
    src = LAUNCH.sub(_keep_lines(_launch), src)
    src = re.sub(r"\breinterpret_cast<", "emu_reinterpret_cast<", src)
    src = KERNEL_BODY.sub(lambda m: m.group(0) + " emu_note_kernel(__PRETTY_FUNCTION__);", src)
    for token in ("__shared__", "<<<"):
        if token in src:
            raise PrepError(f"prep.py: unconverted CUDA construct {token!r} left in {name}")
    return src


def expand(cu: Path) -> Tuple[str, List[Path]]:
    """(host C++ of ``cu`` with its project headers inlined, every file read)."""
    root = cu.resolve().parent
    public = root / "include"
    read: List[Path] = []

    def resolve(name: str, here: Path):
        for base in (here, root, public):  # the compiler's order: -I csrc, -I csrc/include
            p = (base / name).resolve()
            if p.is_file():
                return p if p.is_relative_to(root) else None
        return None  # a toolkit or system header: the compiler's

    def check_public(path: Path):
        read.append(path)
        text = path.read_text()
        if rewrite(text, str(path)) != text:
            raise PrepError(f"prep.py: {path} holds code the emulator rewrites, but the bindings compile it as "
                            "it is: keep device code in csrc/*.cuh")
        for m in QUOTED_INCLUDE.finditer(text):
            p = resolve(m.group(1), path.parent)
            if p and p not in read:
                if not p.is_relative_to(public):
                    raise PrepError(f"prep.py: public header {path} includes {p}, outside csrc/include")
                check_public(p)

    def inline(path: Path) -> str:
        read.append(path)
        text = rewrite(path.read_text(), str(path))
        out, pos, line = [f'#line 1 "{path}"\n'], 0, 1
        for m in QUOTED_INCLUDE.finditer(text):
            p = resolve(m.group(1), path.parent)
            if p is None:
                continue
            if p.is_relative_to(public):  # stays an #include
                if p not in read:
                    check_public(p)
                continue
            line += text.count("\n", pos, m.start())
            out.append(text[pos:m.start()])
            pos = m.end()
            if p not in read:  # a repeated include of an inlined header goes (they are #pragma once)
                out.append(PRAGMA_ONCE.sub("", inline(p)) + f'\n#line {line + 1} "{path}"')
        out.append(text[pos:])
        return "".join(out)

    return inline(cu.resolve()), read


if __name__ == "__main__":
    try:
        sys.stdout.write(expand(Path(sys.argv[1]))[0])
    except PrepError as exc:
        raise SystemExit(str(exc))
