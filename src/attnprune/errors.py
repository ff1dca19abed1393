"""Error types. Every error the library raises on bad input is an ``AttnPruneError``.

Messages name the offending thing (site, file, argument) and say what to do. The CLI prints
``error: <message>`` and exits with status 2, without a traceback.
"""


class AttnPruneError(Exception):
    """Base class of every error attnprune raises on bad input or bad state."""


class NoAttentionSitesError(AttnPruneError):
    """The model has no attention site that either capture path can see."""


class UnsupportedModelError(AttnPruneError):
    """The model (or one of its attention modules) cannot be handled."""


class MaskMismatchError(AttnPruneError):
    """A mask or stats object does not fit the model it is used with (sites, heads, lengths)."""


class InvalidArgumentError(AttnPruneError, ValueError):
    """An argument is outside its allowed range (sparsity, granularity, policy, ...)."""


class EmptyDatasetError(AttnPruneError):
    """The batches given to ``observe`` were empty or held no attendable position."""


class NonFiniteAttentionError(AttnPruneError):
    """Attention probabilities contained NaN or Inf (the message names the site)."""


class CorruptFileError(AttnPruneError):
    """A stats or mask file is truncated, corrupted or not an attnprune file."""


class LengthError(AttnPruneError):
    """An input is longer than the length the mask was calibrated for."""


class MissingDependencyError(AttnPruneError):
    """An optional package (or Debian package / data file) needed for this step is missing."""


class OutputError(AttnPruneError):
    """An output file or folder cannot be written (the message names it and says why)."""


class PluginImportError(AttnPruneError, ImportError):
    """A module that registers model loaders or data sources cannot be imported: the message names the
    module and the import that failed (a broken loader is not reported as an unknown name)."""


class GraphCaptureError(AttnPruneError, RuntimeError):
    """A CUDA graph capture of a masked forward or decode step could not go on (the message says why).

    From ``decode_greedy``: the cache's host state is as it was before the attempt, its device
    buffers may hold the steps already done."""
