"""The canvas: signatures and the primitives that combine them, as in Celery.

* ``signatures``: ``Signature`` (a task call as a dict with Celery's keys), ``signature()``,
  ``maybe_signature()`` and the helpers every primitive shares.
* ``primitives``: ``chain``, ``group``, ``chunks``, ``xmap``, ``xstarmap``.
* ``chords``: the ``chord`` primitive and how a chord is sent (its count recorded first).
* ``chord_completion``: how a chord ends on the worker: parts counted, the body sent once.
* ``callbacks``: links and errbacks of a canvas that failed (errbacks, chains failed onward).

Chords are counted by the result backend's chord store (``Backend.chord_store()``, see
``taskframe.backends.chord``), or polled by ``celery.chord_unlock`` when it has none.

Import from here (or from ``taskframe``); the modules are the package's own layout.
"""

from taskframe.canvas.chords import chord
from taskframe.canvas.primitives import chain, chunks, group, xmap, xstarmap
from taskframe.canvas.signatures import Signature, maybe_signature, signature

__all__ = [
    "Signature",
    "chain",
    "chord",
    "chunks",
    "group",
    "maybe_signature",
    "signature",
    "xmap",
    "xstarmap",
]
