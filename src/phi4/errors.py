"""The one exception a user sees for bad settings or bad files."""


class ConfigError(ValueError):
    """A setting or input that cannot work: the message names it and what would be valid."""
