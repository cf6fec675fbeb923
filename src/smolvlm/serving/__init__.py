"""`smolvlm serve`: an OpenAI-compatible HTTP server, a thin shell over ``generation/engine.py``.

``app.create_app(model, processor, ServerConfig(...))`` builds the FastAPI app; ``parse.py`` turns a
request body into chat messages and settings, ``media.py`` fetches and decodes images and videos,
``completions.py`` runs one request through the engine, ``schemas.py`` shapes the responses,
``errors.py`` the OpenAI error body, ``metrics.py`` the Prometheus text.
"""
