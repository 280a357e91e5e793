"""``slimguard serve``: a compressed model and its Guard behind a hardened HTTP service.

* :mod:`~slimguard.serve.config`: :class:`ServeConfig`, every setting in one place.
* :mod:`~slimguard.serve.loaded`: load an artifact under the signature policy, fit its Guard, choose the
  cascade threshold on validation data, verify checksums, warm up (:func:`load_served`).
* :mod:`~slimguard.serve.batcher`: dynamic micro-batching on one worker thread.
* :mod:`~slimguard.serve.limits`: body size, item count, JSON depth, input decoding, problem documents.
* :mod:`~slimguard.serve.text`: text models: ``{"texts": [...]}`` tokenized under limits, and their guard.
* :mod:`~slimguard.serve.auth`: optional bearer API key, compared in constant time.
* :mod:`~slimguard.serve.metrics`: Prometheus metrics (requests, latency, batches, rejects, OOD, drift,
  fault events, model version).
* :mod:`~slimguard.serve.service`: lifecycle: scrubs, atomic reload with rollback, draining.
* :mod:`~slimguard.serve.app` / :mod:`~slimguard.serve.server`: the FastAPI routes and uvicorn.

FastAPI, uvicorn and prometheus-client (the ``serve`` extra) are imported only when a service starts.

Example:
    >>> from slimguard.serve import ServeConfig, run
    >>> run(ServeConfig(artifact="model.slim", port=8000, api_key_env="MY_API_KEY"))
"""

from slimguard.serve.config import ServeConfig
from slimguard.serve.loaded import LoadedModel, cascade_threshold, load_served
from slimguard.serve.server import run

__all__ = ["LoadedModel", "ServeConfig", "cascade_threshold", "load_served", "run"]
