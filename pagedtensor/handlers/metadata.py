"""Handlers of ops that read only a PagedTensor's metadata (``new_*``, ``*_like``, ``is_same_size``,
``_has_compatible_shallow_copy_type``, forward AD's tangent layout): nothing faults in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._ops import OpOverload

from pagedtensor.dispatch import DISPATCHER, aten, implements
from pagedtensor.tensor import PagedTensor


@implements([aten.new_empty, aten.new_empty_strided, aten.new_zeros, aten.new_ones, aten.new_full])
def new_from_metadata(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``new_*`` reads only the dtype and device of ``self``."""
    source = args[0]
    stand_in = torch.empty(0, dtype=source.dtype, device=source.device)
    return func(stand_in, *args[1:], **kwargs)


@implements([aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.rand_like, aten.randn_like, aten.randint_like])
def like_from_metadata(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``*_like`` reads only the size, strides, dtype and device of ``self``: an uninitialized stand-in."""
    source = args[0]
    if not isinstance(source, PagedTensor):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    stand_in = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, device=source.device)
    return func(stand_in, *args[1:], **kwargs)


@implements([aten._has_compatible_shallow_copy_type.default])
def has_compatible_shallow_copy_type(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> bool:
    """Whether ``t.data = other`` may keep ``t``'s tensor type (what ``Module._apply`` asks, in
    inference mode too, before a parameter conversion): torch compares the two tensors' dispatch
    keys, which a PagedTensor and a plain tensor do not share. No page is read."""
    self, other = args[0], args[1]
    both_paged = isinstance(self, PagedTensor) == isinstance(other, PagedTensor)
    return both_paged and self.device.type == other.device.type and self.layout == other.layout


@implements([aten.is_same_size.default])
def is_same_size(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> bool:
    return args[0].shape == args[1].shape


@implements([aten.is_set_to.default])
def is_set_to(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> bool:
    """``t.is_set_to(u)``: whether both view one storage at the same storage offset with the same
    sizes and strides (torch's test; the dtypes are not compared). No page is read: PagedTensors
    share storage when they share their paged storage (views of one another), and a PagedTensor
    shares none with a plain tensor. Inner dense tensors (inside a compiled graph) answer for
    themselves."""
    self, other = args[0], args[1]
    paged = [t._paged if isinstance(t, PagedTensor) else None for t in (self, other)]
    if any(isinstance(t, PagedTensor) and storage is None for t, storage in zip((self, other), paged)):
        return DISPATCHER.run_paged(func, types, args, kwargs)
    if paged[0] is None or paged[0] is not paged[1]:
        return False
    return self._offset == other._offset and self.shape == other.shape and self.stride() == other.stride()


def _meta_of_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``tensor``'s storage size, storage offset, sizes and strides: what an op
    that reads a tensor's storage layout sees of it (the pages' slab would show the slab's)."""
    storage = torch.UntypedStorage(tensor.untyped_storage().nbytes(), device="meta")
    return torch.empty(0, dtype=tensor.dtype, device="meta").set_(storage, tensor.storage_offset(), tensor.shape, tensor.stride())


@implements([aten._new_zeros_with_same_feature_meta.default])
def new_zeros_with_same_feature_meta(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> Any:
    """Forward AD's tangent for a primal ``other``: zeros of ``self``'s dtype and device, laid out as
    ``other``'s storage (its size, offset and strides), ``self``'s batch dims in front. Of ``self``
    only the sizes, dtype and device are read."""
    self, other = args[0], args[1]
    meta_self = torch.empty((), dtype=self.dtype, device="meta").expand(self.shape)
    meta_other = _meta_of_storage(other)
    layout = func(meta_self, meta_other, *args[2:], **kwargs)  # torch's own layout, on the meta device
    zeros = torch.zeros(layout.untyped_storage().nbytes() // layout.element_size(), dtype=self.dtype, device=self.device)
    return zeros.as_strided(layout.shape, layout.stride(), layout.storage_offset())


@implements([aten._has_same_storage_numel.default])
def has_same_storage_numel(func: OpOverload, types: tuple, args: tuple, kwargs: dict) -> bool:
    """Whether two tensors' storages hold as many elements (forward AD's check of a tangent)."""
    return func(*(_meta_of_storage(t) if isinstance(t, PagedTensor) else t for t in args), **kwargs)
