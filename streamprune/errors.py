"""Errors a user can cause. The CLI turns each into one line on stderr and an exit code."""

EXIT_USAGE = 2  # bad input: file, flag value, method or model name
EXIT_PARTIAL = 3  # batch: some inputs failed, the rest were processed


class StreampruneError(Exception):
    """Base of every error caused by user input; `exit_code` is what the CLI returns."""

    exit_code = EXIT_USAGE


class InputError(StreampruneError):
    """A file, URL or source that cannot be read as the video it should be."""


class ConfigError(StreampruneError):
    """A flag or config value out of range, or an unknown name."""


class ModelError(StreampruneError):
    """A model path that does not exist or holds no supported model."""


class OutputError(ConfigError):
    """An output path that cannot be written: a folder, under a regular file, a device or FIFO,
    no permission, a read-only or full file system (see `streamprune.outputs`). A ConfigError:
    the flag that names it is what the user changes."""
