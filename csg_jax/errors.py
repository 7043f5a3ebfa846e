"""Errors that carry a message meant for the user (the CLI prints them without a traceback)."""


class CSGError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(CSGError):
    """A model config.json (or our own config) is malformed or asks for an unsupported feature."""


class CheckpointError(CSGError):
    """A model folder / file is missing, unreadable or does not fit the architecture."""


class PromptError(CSGError):
    """A prompt or task cannot be used (e.g. the source word is missing)."""


class ImageError(CSGError):
    """An input image cannot be read."""
