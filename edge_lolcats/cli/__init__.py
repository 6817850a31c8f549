"""The ``edge-lolcats`` command line (entry point :func:`main`); one module per command."""
from .main import main  # noqa: F401
