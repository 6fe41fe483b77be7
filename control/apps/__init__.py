"""Applications: the ``drover`` CLI, the launcher (``drover up``), the OpenAI gateway, ``drover top``, the
process entry points, provisioners that spawn engine processes, health endpoints and the metrics exporter.

The top layer: apps may import the actors and everything beneath; nothing imports an app.
"""
