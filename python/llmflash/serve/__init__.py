"""`llmflash serve`: an OpenAI-compatible HTTP server over one store (Starlette on uvicorn).

    protocol.py   the requests (pydantic, strict: wrong types and unknown fields are 400s) and the
                  OpenAI response, chunk and error bodies
    stops.py      stop sequences found in text that arrives in pieces, held back across pieces
    engine.py     one model, one decode at a time: a bounded FIFO of jobs and the worker thread
                  that runs them, so the event loop never waits on inference
    metrics.py    per-request log lines and the /metrics counters (Prometheus text)
    app.py        the routes, the body-size limit and the error handlers

Above llmflash.api (the engine drives a FlashModel); llmflash.commands.serve starts it.
"""
