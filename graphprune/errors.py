"""Every error graphprune raises on bad input derives from :class:`GraphpruneError`."""


class GraphpruneError(Exception):
    """Base class of all graphprune errors."""


class TraceError(GraphpruneError):
    """The model could not be traced into a graph with ``torch.export``."""


class UnsupportedOpError(GraphpruneError):
    """An ATen op has no channel-propagation rule and ``strict=True`` was asked for."""


class PlanError(GraphpruneError):
    """A pruning plan or ratio is invalid, or belongs to another model."""


class RewriteError(GraphpruneError):
    """The rewritten graph is inconsistent (a shape could not be updated)."""


class ExportError(GraphpruneError):
    """A graph could not be exported (ONNX, .pt2)."""


class LoadError(GraphpruneError):
    """A saved model or plan could not be loaded (missing, corrupt, or for another model)."""
