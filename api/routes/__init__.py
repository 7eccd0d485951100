"""The API's routes, one module per resource; each a thin shell over core.service."""
