"""Exception families (design.md, "Errors").

Every message names the file, config key or CSV row at fault, so a user can fix the input
without reading a traceback. Validation happens before training starts wherever possible.
"""


class MdkdError(Exception):
    """Base class of every error this package raises on purpose.

    The message is kept on one line: whitespace runs (newlines included, e.g. from an embedded
    pydicom or JSON error) are collapsed to single spaces when the error is created.
    """

    def __init__(self, *args) -> None:
        if args and isinstance(args[0], str):
            args = (" ".join(args[0].split()),) + args[1:]
        super().__init__(*args)


class ConfigError(MdkdError, KeyError):
    """Bad config: unknown key, bad value, or a YAML file that cannot be read.

    Subclasses ``KeyError`` so code written against yacs/fvcore (which raise ``KeyError`` for
    unknown keys) keeps working. ``str()`` returns the plain message (KeyError would quote it).
    """

    def __str__(self) -> str:  # KeyError.__str__ adds quotes around the message
        return str(self.args[0]) if self.args else ""


class DatasetError(MdkdError, ValueError):
    """Bad dataset input: missing image, unreadable DICOM, malformed annotation row, ..."""


class CheckpointError(MdkdError, RuntimeError):
    """A checkpoint that is missing, unreadable or does not match its declared architecture."""


class RegistryError(MdkdError, KeyError):
    """An unknown name was looked up in a registry; the message lists the registered names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def user_message(e: BaseException) -> str:
    """The one-line message of ``e`` for the CLI (``error: <message>``).

    A DataLoader worker re-raises an error in the main process with the worker's traceback in
    its message (``Caught DatasetError in DataLoader worker process 0. Original Traceback ...``,
    torch ``ExceptionWrapper``); the message is then the text after the traceback's last
    ``module.Class: `` prefix. Any other message is returned with its whitespace collapsed.
    """
    text = " ".join(str(e).split())
    if "Original Traceback" in text:
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        at = text.rfind(prefix)
        if at >= 0:
            text = text[at + len(prefix):]
    return text
