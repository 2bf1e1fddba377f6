"""Model files that Triton's Python backend loads (``model.py`` in each version directory). They import
``triton_python_backend_utils``, which exists only inside Triton's Python stub: never import them elsewhere."""
