"""Public ops: argument checks, backend dispatch, torch.library custom ops and autograd."""
