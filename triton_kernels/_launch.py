"""Launch-configuration helpers shared by the Triton launchers."""

import torch


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 1 for CPU tensors (the interpreter),
    which keeps interpreted grids small."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
