"""Errors the harness reports as one line with what to do, and the exit codes of a run."""


class DataError(Exception):
    """Bad input data or tokenizer: the message names the file (and line) and the fix."""


class ConfigError(ValueError):
    """An argument or configuration value that cannot work."""


#: Exit codes of a training run, so that drivers can tell outcomes apart.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_OOM = 3
EXIT_NAN = 4
EXIT_INTERRUPTED = 130
