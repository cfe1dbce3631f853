"""The OpenAI-compatible HTTP API: Tandem's routed specialists behind the API every tool already speaks.

`protocol.py` declares the request shape and the error format once; `app.py` is the thin Starlette
layer that maps requests to the workstation and streams what comes back; `server.py` runs it on
uvicorn in the process that owns the model, so the app and API clients share one inference worker.
"""
