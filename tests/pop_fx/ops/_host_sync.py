"""A dispatch mode that fails on host syncs and data-dependent shapes (shared by the experts ops' tests)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoHostSync(TorchDispatchMode):
    """Fails on any op whose output shape or value must be read on the host: ``.item()``/``bool()``/``int()``
    (aten._local_scalar_dense), ``nonzero``/``where(cond)``, ``masked_select``, ``unique``, ``repeat_interleave``
    without a size... — every op torch tags ``dynamic_output_shape`` or ``data_dependent_output``."""

    BAD_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t in func.tags for t in self.BAD_TAGS):
            raise AssertionError(f"host sync / data-dependent shape: {func}")
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
