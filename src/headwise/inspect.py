"""``headwise.inspect``: the head-analysis toolkit under the name of its command (``headwise inspect``).

The same objects as :mod:`headwise.analysis`, e.g. ``with headwise.inspect.capture(model) as rec: ...``.
"""

from headwise.analysis import *  # noqa: F401,F403
from headwise.analysis import __all__  # noqa: F401
