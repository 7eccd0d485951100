"""The FastAPI app: routes, schemas, auth, limits and the web page."""
