"""Errors the user can fix by editing the config."""


class ConfigError(ValueError):
    """A bad config value or file. The message is one line and starts with the config key."""
