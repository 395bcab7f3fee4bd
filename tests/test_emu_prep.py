"""tests/cuda_emulation/prep.py: the project headers a .cu includes are inlined and
rewritten with it (no device code escapes the emulator's checks by living in a
header), and the emulation build's cache key covers them."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import test_cuda_emulation as emu

PREP = emu._PREP
ROOT = Path(__file__).resolve().parents[1]


def _tree(tmp_path, files):
    for name, text in files.items():
        p = tmp_path / "csrc" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path / "csrc"


HELPER = """#pragma once
#include "inner.cuh"
#include "posenc_fast/api.h"
template <typename T>
__device__ void helper(const float* p, T* out) {
  __shared__ float red[2][32];
  red[0][threadIdx.x] = *reinterpret_cast<const T*>(p);
}
"""


def test_project_headers_are_inlined_once_and_rewritten(tmp_path):
    csrc = _tree(tmp_path, {
        "k.cu": '#include "inner.cuh"\n#include "helper.cuh"\n#include <algorithm>\n'
                "__global__ void k(const float* p) { helper<float>(p, nullptr); }\n"
                "void launch() { k<<<1, 32>>>(nullptr); }\n",
        "helper.cuh": HELPER,
        "inner.cuh": "#pragma once\n__device__ inline int inner() { return 1; }\n",
        "include/posenc_fast/api.h": "#pragma once\nstruct Api { int n; };\n",
    })
    out, read = PREP.expand(csrc / "k.cu")
    assert read == [(csrc / p).resolve() for p in ("k.cu", "inner.cuh", "helper.cuh", "include/posenc_fast/api.h")]
    assert out.count("inline int inner()") == 1  # included twice, inlined once
    assert "emu_reinterpret_cast<const T*>(p)" in out and not re.search(r"(?<!emu_)reinterpret_cast<", out)
    assert "*emu_shared<EmuShared<float>[2][32]>()" in out
    assert "emu_launch(dim3(1), dim3(32), 0" in out
    # the public API header stays an #include; toolkit and system headers are the compiler's
    assert '#include "posenc_fast/api.h"' in out and "struct Api" not in out
    assert "#include <algorithm>" in out and "#pragma once" not in out
    # #line markers map the helper's line back to its file
    lines = out.split("\n")
    at = next(i for i, line in enumerate(lines) if "emu_reinterpret_cast" in line)
    marker = next(line for line in reversed(lines[:at]) if line.startswith("#line"))
    start = lines.index(marker)
    assert marker == f'#line 1 "{(csrc / "helper.cuh").resolve()}"'
    assert HELPER.split("\n")[at - start - 1].strip().startswith("red[0][threadIdx.x]")
    # back in k.cu after an inlined header: the line after its #include
    assert lines[lines.index("#include <algorithm>") - 1] == f'#line 3 "{(csrc / "k.cu").resolve()}"'


def test_an_unconverted_construct_in_a_header_fails(tmp_path):
    csrc = _tree(tmp_path, {"k.cu": '#include "helper.cuh"\n',
                            "helper.cuh": "#pragma once\n__device__ void f() { __shared__ float scalar; }\n"})
    with pytest.raises(PREP.PrepError, match=r"'__shared__' left in .*helper\.cuh"):
        PREP.expand(csrc / "k.cu")
    res = subprocess.run([sys.executable, str(emu.EMU / "prep.py"), str(csrc / "k.cu")], capture_output=True,
                         text=True)
    assert res.returncode != 0 and "helper.cuh" in res.stderr


def test_device_code_in_a_public_header_fails(tmp_path):
    csrc = _tree(tmp_path, {
        "k.cu": '#include "posenc_fast/api.h"\n',
        "include/posenc_fast/api.h": '#pragma once\n#include "posenc_fast/common.h"\n',
        "include/posenc_fast/common.h": "#pragma once\ninline int* f(long p) { return reinterpret_cast<int*>(p); }\n",
    })
    with pytest.raises(PREP.PrepError, match=r"common\.h holds code the emulator rewrites"):
        PREP.expand(csrc / "k.cu")


def test_every_family_has_all_its_device_code_rewritten():
    for cu, _ in emu.FAMILIES.values():
        out, read = PREP.expand(ROOT / "csrc" / f"{cu}.cu")
        assert (ROOT / "csrc" / "device_utils.cuh").resolve() in read
        assert not re.search(r"(?<!emu_)reinterpret_cast<", out), cu


def test_the_build_cache_key_covers_inlined_headers(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    monkeypatch.setattr(emu, "CSRC", csrc)

    def key():
        return emu._cache_key("pyramid", PREP.expand(csrc / "pyramid_pos_level_add.cu")[1])

    before = key()
    with (csrc / "device_utils.cuh").open("a") as f:
        f.write("// changed\n")
    assert key() != before
