"""pop-fx: Partition-guided Online Pruning (POP) for torch.compile.

    model.compile(backend="pop", options={"sparsity": 0.5})   # or pop_fx.compile(model, sparsity=0.5)
    model.generate(...)
"""

def _own_passes() -> None:
    """Import pop-fx's own top-level ``passes`` package (it ships beside ``pop_fx``), never another one of that name:
    a ``passes/`` folder in the working directory, or another distribution's, would shadow it on ``sys.path``."""
    import importlib.util
    import sys
    from pathlib import Path

    ours = Path(__file__).resolve().parent.parent / "passes" / "__init__.py"
    found = sys.modules.get("passes")
    if found is not None:
        if Path(getattr(found, "__file__", "") or "").resolve() != ours:
            raise ImportError(f"pop-fx needs its own 'passes' package ({ours}), but another module of that name is "
                              f"already imported ({getattr(found, '__file__', found)!r}): rename that one, or "
                              "import pop_fx first")
        return
    spec = importlib.util.spec_from_file_location("passes", ours, submodule_search_locations=[str(ours.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["passes"] = module
    spec.loader.exec_module(module)


_own_passes()

from pop_fx.config import PopConfig  # noqa: E402
from pop_fx.partition import PartitionSizes, partition_sizes
from pop_fx import ops as _ops  # noqa: F401  (registers the pop:: custom ops)
from pop_fx.backend import pop_backend, register as _register
from pop_fx.api import compile, decompile, report, reset
from pop_fx.fastgen import greedy

_register()

__version__ = "0.1.0"

__all__ = [
    "PopConfig",
    "PartitionSizes",
    "compile",
    "decompile",
    "greedy",
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
