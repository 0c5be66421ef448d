"""Typed errors: one class per kind of user mistake.

The library raises these; the CLI turns them into a one-line message and exit code 2.
Every message says what went wrong and what to do next, in the library's words: a message names
the *parameter* at fault (`frames must be >= 1`), and `parameter` carries its name so that the CLI
can say which flag that is.
"""


class SCDError(Exception):
    """Base class of every error a user can cause and fix."""

    def __init__(self, message: str = "", parameter: str | None = None, others: tuple[str, ...] = ()):
        super().__init__(message)
        self.parameter = parameter
        self.others = tuple(others)  # further parameters the message names, each spelled as its flag too


class VideoError(SCDError):
    """A video or image input that cannot be read, or a video that cannot be written."""


class OutputError(SCDError):
    """An output path that cannot or must not be written (missing folder, read-only, a device, the
    input itself, or one another run is writing)."""


class CheckpointError(SCDError):
    """A model folder, checkpoint or options file that is missing, corrupt or does not match."""


class ConfigError(SCDError):
    """An impossible model configuration or option value."""


class HubError(SCDError):
    """A Hugging Face Hub reference that cannot be resolved or downloaded."""


class TextError(SCDError):
    """A text prompt or text encoder that cannot be used: an empty prompt, a base folder without
    `tokenizer/` or `text_encoder/`, an encoder that does not load."""


class ActionError(SCDError):
    """Actions that the model does not know, or too few or too many of them."""


class DeviceError(SCDError):
    """A device or dtype that is not available here."""


class DataError(SCDError):
    """Training or evaluation data that cannot be used."""


class ServerError(SCDError):
    """A local server that cannot start: a port in use, an address that cannot be listened on."""


class Notice(str):
    """A warning for the user, in the library's words (a plain string); `parameter`, as an error's,
    names the parameter it mentions so that the CLI can say which flag that is."""

    parameter: str | None

    def __new__(cls, message: str, parameter: str | None = None):
        notice = super().__new__(cls, message)
        notice.parameter = parameter
        return notice
