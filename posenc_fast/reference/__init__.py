"""Pure-PyTorch references: one per op family, written for clarity (the spec in code)."""
