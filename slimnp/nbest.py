"""Moved to :mod:`slimnp.mt.nbest`.  This alias keeps ``slimnp/cli.py``'s
imports working until its ``rerank`` and ``data nbest`` commands import from
:mod:`slimnp.mt`; then delete it (nothing else uses the old name)."""
import sys

from .mt import nbest as _moved

sys.modules[__name__] = _moved
