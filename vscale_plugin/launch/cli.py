"""One-line errors for every launcher: a bad input is ``error: <what was wrong and the fix>`` and exit code 2."""

from __future__ import annotations

import argparse
import sys


class ConfigError(ValueError):
    """A bad --ds_config or batch setting; the message names the fix. Launchers exit 2 on it."""


class UsageError(ConfigError):
    """A bad flag value; the message names the fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 (via UsageError and ``fail``), not a usage block.
    Every launcher uses it."""

    def error(self, message: str):
        raise UsageError(f"{message}; see --help")


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2
