"""The base of every deepclick error (DESIGN.md, dependency rules, layer 1).

Every exception the project raises on purpose derives from :class:`DeepclickError` (and, where
callers already catch a built-in kind, from that too: ``class SpecError(DeepclickError,
ValueError)``), so the entry points catch one class: the CLI prints the message, which names the
rule broken and the fix, and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DeepclickError(Exception):
    """A refusal or failure the user can act on; the message says what is wrong and what to do."""
