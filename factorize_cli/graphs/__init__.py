"""Formats that carry code, not just tensors: TorchScript archives and torch.export ``.pt2`` programs.

``format.py`` puts both behind the one format interface; ``torchscript.py`` and ``export.py`` are their
graph rewrites (``candidate.py`` and ``write.py`` what the two share), ``calibrate.py`` their
activation taps and ``verify.py`` the side-by-side run of ``--verify``.
"""
