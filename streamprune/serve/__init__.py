"""`streamprune serve`: the OpenAI-compatible video API, live stream sessions and the web page.

protocol.py the OpenAI wire format; media.py a request's frames; engine.py the shared model;
streams.py live sessions over the streaming runtime; app.py the FastAPI routes and the server."""
