"""`mupad serve`: a local web page that generates H&E tiles from a trained checkpoint.

    mupad serve --checkpoint runs/kather            # http://127.0.0.1:8000

Layout: `service.py` turns a form into a prompt record and runs the generation engine
(`mupad.applications.batch_generate`) on one worker thread, with the limits; `app.py` is the
FastAPI wiring (routes, body-size limit, error -> status mapping); `page.py` the one HTML
page and its script; `cli.py` the typer command. FastAPI and uvicorn are the optional
`serve` extra, imported only by `app.py` and inside the command, so `import mupad` never
needs them.
"""
