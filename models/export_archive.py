"""Write a Keras ``ExportArchive`` as a SavedModel with every endpoint traced once.

Keras's ``ExportArchive.write_out`` traces each endpoint twice: once to find the variables and
lookup tables the endpoint uses, and again inside ``tf.saved_model.save``, because the save
context (its variable policy) is part of the ``tf.function`` cache key. On the small models of
the daily run that graph building is a large share of an export: a crossed ranker's SavedModel
took 5.8-7.5 s of CPU to write, 3.6-5.7 s traced once (``tests/test_daily.py``'s world).

Here the concrete functions of the first trace become the signatures, and the polymorphic
functions are dropped from the saved object, so the save has nothing left to retrace. Nothing
here reads them back: callers (and TF Serving) use ``loaded.signatures``. The archive's
internals are Keras's; where they differ from what this expects, Keras's own ``write_out``
runs (slower, same SavedModel).
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


def write_traced_once(archive: keras.export.ExportArchive, folder: Path | str) -> None:
    """Save ``archive`` (endpoints added) to ``folder`` with each endpoint traced once."""
    try:
        archive._filter_and_track_resources()  # variables and lookup tables of the endpoints
        saved = archive._tf_trackable
        names = list(archive._endpoint_names)
        signatures = {name: getattr(saved, name).get_concrete_function() for name in names}
    except (AttributeError, TypeError) as exc:  # another Keras: its own (double) trace
        log.info("ExportArchive internals differ (%s): Keras's write_out", exc)
        archive.write_out(str(folder), verbose=False)
        return
    if "serving_default" not in signatures:  # what write_out adds for TF Serving
        signatures["serving_default"] = signatures[names[0]]
    for name in names:
        delattr(saved, name)
    tf.saved_model.save(saved, str(folder), signatures=signatures)
