"""Serving an artifact with NVIDIA Triton Inference Server: a generated model repository (``repository``) and the
Python-backend models it runs (``models/``: thin wrappers over :mod:`prumerge.runtime`, the same code path as
``prumerge-export run``). Torch-free, like the runtime."""
