"""ComplexFormer's complex multi-head attention on heads: the rotation form (fast path) and the polar-form score
(reference)."""

from headwise.ops.complex.complex import complex_attention, complex_rotate, polar
from headwise.ops.complex.naive import naive_complex_attention

__all__ = ["complex_attention", "complex_rotate", "polar", "naive_complex_attention"]
