"""`gptctl serve`: an OpenAI-compatible HTTP API (and a chat page) over one checkpoint.

protocol.py reads and checks requests and writes OpenAI's response shapes; app.py is the FastAPI
application over an engine/batch.py Batcher (the one thread that runs the model); server.py runs it
under uvicorn. Needs the `serve` extra (fastapi, uvicorn).
"""
