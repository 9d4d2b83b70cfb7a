"""Errors shared across packages. A leaf module."""


class ConfigError(ValueError):
    """A recipe or command-line setting that cannot run, named by its key."""
