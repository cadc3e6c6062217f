"""Visual-token pruning methods behind one interface (`base.PruningMethod`) and one registry."""

from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.pruning.registry import available, describe, make_method, register

__all__ = ["Budget", "PruneContext", "PruningMethod", "available", "describe", "make_method", "register"]
