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


def run_guarded(job, on_interrupt: str = "stopped"):
    """``job()``'s result, or an exit code: 2 with a one-line ``error: ...`` on stderr for a
    CSGError (no traceback: the message already says what to do), 130 on Ctrl-C."""
    import sys

    try:
        return job()
    except CSGError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {on_interrupt}", file=sys.stderr)
        return 130
