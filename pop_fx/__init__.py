"""pop-fx: Partition-guided Online Pruning (POP) for torch.compile.

    model.compile(backend="pop", options={"sparsity": 0.5})   # or pop_fx.compile(model, sparsity=0.5)
    model.generate(...)
"""

from .config import PopConfig
from .partition import PartitionSizes, partition_sizes

__version__ = "0.1.0"

__all__ = ["PopConfig", "PartitionSizes", "partition_sizes", "__version__"]
