"""``defectscope serve``: models behind an HTTP API on FastAPI + uvicorn (the ``serve`` extra).

Importing this package is free: FastAPI, uvicorn and prometheus_client load only when a server is
built (:func:`defectscope.serve.app.create_app`) or started (:func:`defectscope.serve.command.run`).

    app.py        the routes, errors as ``{"error": ...}``, the API key, the page at ``/``
    batching.py   the model slots (atomic reload) and the dynamic micro-batcher
    uploads.py    the request body: size limit, raw or multipart, header-checked decoding
    metrics.py    the Prometheus metrics, in a registry per app
    settings.py   the limits and their defaults
    command.py    the command line: arguments, loading the models, uvicorn, signals
"""

from __future__ import annotations

EXTRA_HINT = "pip install 'defectscope[serve]'"
"""What to run when the serve extra is missing."""
