"""Backends of rocmoe, installed as ``rocmoe.backends``: one package per backend
(``aiter``, ``triton``, ``torch``), one module per op inside it."""
