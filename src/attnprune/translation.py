"""Former home of the translation experiment, now :mod:`attnprune.experiments.translation`.

Importing ``attnprune.translation`` gives that module itself (the same object), so existing imports
and ``monkeypatch.setattr(attnprune.translation, ...)`` keep working.
"""

import sys

from .experiments import translation as _translation

sys.modules[__name__] = _translation
