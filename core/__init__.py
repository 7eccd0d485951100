"""Small and shared: the settings class and the container that builds components from it."""
