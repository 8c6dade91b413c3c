"""`minillm.evaluate`: the public name of minillm/apps/evaluate.py (perplexity in the four modes).

    from minillm.evaluate import perplexity

This module is that one: importing it puts minillm.apps.evaluate in its place, so a name set on
either (a test's monkeypatch) is seen by both.
"""

import sys

from .apps import evaluate as _evaluate

sys.modules[__name__] = _evaluate
