"""The dashboard: a page that shows a running server's applications, live."""
