"""Launch-configuration helpers shared by the Triton launchers."""

import functools

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
