"""headwise: multi-head attention variants from recent papers behind one interface.

>>> import torch, headwise
>>> q = k = v = torch.randn(1, 8, 1024, 64)                       # [B, H, N, D]
>>> out = headwise.attention(q, k, v, headwise.patterns.Causal())
>>> m = headwise.create("mha", dim=512, heads=8)                    # nn.Module, [B, N, C] -> [B, N, C]
"""

from headwise import patterns
from headwise.core import attention, merge_attention
from headwise.ops import linear
from headwise.variants import available, create, register
from headwise.variants.mha import MultiHeadAttention

__version__ = "0.1.0"

__all__ = ["attention", "merge_attention", "patterns", "linear", "create", "available", "register", "MultiHeadAttention",
           "__version__"]

# imported on first use, so that `import headwise` stays light: the tools, and two ops packages by their short names
_LAZY = {
    "inspect": "headwise.inspect", "analysis": "headwise.analysis", "arena": "headwise.arena",
    "bench": "headwise.bench", "simulate": "headwise.simulate", "moa": "headwise.moa", "parallel": "headwise.parallel",
    "distributed": "headwise.distributed", "losses": "headwise.losses", "selection": "headwise.ops.selection",
}
# the tool packages, which `import headwise` never loads
TOOLS = ("inspect", "analysis", "arena", "bench", "simulate", "moa", "parallel", "cli", "demo")


def __getattr__(name: str):
    """``headwise.inspect``, ``headwise.arena``, ... import on first use (``import headwise`` stays light)."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'headwise' has no attribute {name!r}")
