"""Launch-configuration helpers shared by the Triton launchers."""

import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 1 for CPU tensors (the interpreter),
    which keeps interpreted grids small. Cached: a property query per launch costs
    more host time than a small kernel takes on the GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# Host-side twins of triton.cdiv / triton.next_power_of_2, which cost over a
# microsecond a call in recent triton (they are wrapped for use inside kernels):
# launchers call them several times per launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 1


def batch_per_program(tiles: int, B: int, slots: int, max_slices: Optional[int] = None) -> int:
    """Batch rows per program of a kernel that streams each embedding tile onto a
    slice of the batch: grid = tiles x slices (csrc/device_utils.cuh
    ``batch_per_block`` is its CUDA twin).

    A problem too small to fill one wave of ``slots`` resident programs gets one row
    per program (sampling: latency over reuse). Otherwise the slice count whose grid
    ends closest to whole waves, among those that re-read the tables at most about
    5% of x's bytes (``max_slices``; by default 1 + B / 10, for tables of x's rows
    and dtype), fewest slices first."""
    if tiles * B <= slots:
        return 1
    if max_slices is None:
        max_slices = 1 + B // 10
    best_eff, best = -1.0, B
    for s in range(1, max(1, min(B, max_slices)) + 1):
        per = cdiv(B, s)
        eff = wave_efficiency(tiles * cdiv(B, per), slots)
        if eff > best_eff + 1e-9:
            best_eff, best = eff, per
    return best


def wave_efficiency(grid: int, slots: int) -> float:
    """Fraction of the resident-program slots the last wave leaves busy, over the run."""
    return grid / (cdiv(grid, slots) * slots)


@functools.lru_cache(maxsize=1024)
def stream_tiling(B: int, n: int, C: int, slots: int, tile: int = 2048):
    """(BLOCK_C, BLOCK_T, batch rows per program) of a kernel whose programs build a
    (token block, channel block) embedding tile of about ``tile`` elements once and
    stream it onto a slice of the batch. Tile width and slices are chosen for whole
    waves of ``slots`` resident programs (a channel block that does not divide C also
    leaves lanes idle).
    Cached: sampling calls the same few shapes at every step."""
    best = None
    for width in (256, 128):
        block_c = min(next_power_of_2(C), width)
        block_t = max(1, min(tile // block_c, next_power_of_2(n)))
        tiles = cdiv(n, block_t) * cdiv(C, block_c)
        per = batch_per_program(tiles, B, slots)
        eff = wave_efficiency(tiles * cdiv(B, per), slots) * C / (cdiv(C, block_c) * block_c)
        if best is None or eff > best[0] + 1e-9:
            best = (eff, block_c, block_t, per)
    return best[1:]
