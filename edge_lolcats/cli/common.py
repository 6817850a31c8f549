"""What every command shares: the program name, the user-error type, argument types."""
from __future__ import annotations

import argparse

PROG = "edge-lolcats"


class CLIError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def _user_errors():
    """Exception types that mean bad input (printed as one line), imported lazily."""
    from edge_lolcats.formats.gguf_io import ModelFileError
    from edge_lolcats.formats.tokenizer import TokenizerError

    return (CLIError, ModelFileError, TokenizerError, ValueError, OSError, UnicodeDecodeError)  # incl. subclasses


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values
