import os
import sys

import torch

# `pytest bench` from the repo root: make `import harness` work.
sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
