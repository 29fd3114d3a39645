"""Package names imported on first use (PEP 562), so that importing a package costs only what is used.

The vector stage, the geodata tools and the configuration need neither torch nor transformers (about 1 GB
resident once imported); the model, its processor and the data pipeline do. A package lists where each of
its public names lives, and ``lazy_exports`` gives it the module ``__getattr__`` and ``__dir__`` that
import the defining module when a name is first asked for (``from sidewalk_hf import X`` included).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose name ``n`` lives in its submodule
    ``exports[n]`` (relative, e.g. ``".modeling_sidewalk_deeplab"``)."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # found in the module's namespace from now on
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
