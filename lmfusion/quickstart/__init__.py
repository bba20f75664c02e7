"""``lmfusion quickstart``: the end-to-end demo on real data (see :mod:`lmfusion.quickstart.run`)."""

from lmfusion.quickstart.run import add_subparser

__all__ = ["add_subparser"]
