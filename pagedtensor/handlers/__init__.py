"""The op handlers of :class:`~pagedtensor.dispatch.PagedDispatcher`, one module per kind of op, each
registered with ``@implements`` as its module is imported (step 1 of the dispatch order, see
:mod:`pagedtensor.dispatch`, which imports this package once its core is defined).

The modules are imported in a fixed order, which is the order of ``DISPATCHER.handlers``; an op
registers once (:meth:`~pagedtensor.dispatch.PagedDispatcher.implements` raises otherwise).
:mod:`~pagedtensor.handlers.parts` holds helpers the copies, reductions and row scatters share, and
:mod:`~pagedtensor.handlers.linear` the functions a paged model calls outside the dispatcher.
"""

from __future__ import annotations

# In this order (not sorted): the order the handlers register in.
from pagedtensor.handlers import views, conversions, copies, reductions, metadata, fills, random_ops, row_gathers, row_scatters, scatter_copies, row_moves, row_wise, nonzero, grouped_mm, linear

__all__ = ["views", "conversions", "copies", "reductions", "metadata", "fills", "random_ops", "row_gathers", "row_scatters", "scatter_copies", "row_moves", "row_wise", "nonzero", "grouped_mm", "linear"]
