"""The HTTP side: the FastAPI app (app.create_app), its routes, request bodies, errors, metrics and lifecycle."""
