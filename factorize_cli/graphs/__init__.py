"""Formats that carry code, not just tensors: TorchScript archives and torch.export ``.pt2`` programs.

``format.py`` puts both behind the one format interface; ``torchscript.py`` and ``export.py`` are their
graph rewrites (``candidate.py`` and ``write.py`` what the two share), ``calibrate.py`` their
activation taps, ``verify.py`` the side-by-side run of ``--verify``, and ``calls.py`` the one inputs format
(sequences of calls, ``--method``, ``--reset``) that every run of a program reads.
"""
