"""Graph rewrites for formats that carry code, not just tensors (TorchScript)."""
