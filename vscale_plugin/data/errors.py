"""The one error type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset or tokenizer the pipeline cannot use; the message names the problem and the fix.

    Launchers turn it into a one-line message and exit code 2, before any training starts.
    """
