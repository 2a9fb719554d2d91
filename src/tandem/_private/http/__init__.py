"""tandem's HTTP side: the proxy (ASGI, served by uvicorn) and the replica-side bridge."""
