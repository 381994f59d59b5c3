"""pop-fx: Partition-guided Online Pruning (POP) for torch.compile.

    model.compile(backend="pop", options={"sparsity": 0.5})   # or pop_fx.compile(model, sparsity=0.5)
    model.generate(...)
"""

from pop_fx.config import PopConfig
from pop_fx.partition import PartitionSizes, partition_sizes
from pop_fx import ops as _ops  # noqa: F401  (registers the pop:: custom ops)
from pop_fx.backend import pop_backend, register as _register
from pop_fx.api import compile, decompile, report, reset

_register()

__version__ = "0.1.0"

__all__ = [
    "PopConfig",
    "PartitionSizes",
    "compile",
    "decompile",
    "partition_sizes",
    "pop_backend",
    "report",
    "reset",
    "__version__",
]


def __getattr__(name):
    # Submodules that pull in transformers load on first use, so `import pop_fx` stays light.
    import importlib

    if name in ("reference", "sites", "tools"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pop_fx' has no attribute {name!r}")
