"""An OpenAI-compatible HTTP gateway in front of Drover: ``drover gateway``.

OpenAI clients (``openai.OpenAI(base_url="http://127.0.0.1:8000/v1")``) talk to it; it submits every
request over NATS like any Drover client. See docs/operators.md. Modules: ``settings`` (the ``[gateway]``
section), ``schema`` (request bodies -> a Drover submission), ``service`` (the NATS side), ``app`` (HTTP),
``server`` (uvicorn), ``access`` (keys, limits, usage), ``prompts`` (chat template), ``stops`` (stop
strings), ``errors`` (OpenAI error bodies).

This package's ``__init__`` imports nothing, so ``control.settings`` can import the settings section
without pulling in FastAPI.
"""
