"""Functional cores, one folder per mechanism, with the readable reference (``naive.py``) beside the fast path.

``ops/<mechanism>/`` holds functions on heads (``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, M, D]``); the
modules of :mod:`headwise.variants` own the parameters and call them. Each fast path is tested against its
``naive`` reference, forward and gradients, in float64. Layer: above :mod:`headwise.core` and
:mod:`headwise.patterns`, below :mod:`headwise.variants`.
"""
