"""The package's one base exception, and which errors the command line expects.

Every error that means "the input or a store is not usable" (a bad config, a corrupt data
file, an unreachable tracking store, a study that cannot start) is a `MnistTrackError`;
the CLI prints it as one line. The stores' own exceptions (MLflow, Optuna, SQLAlchemy,
the operating system) are expected too, and mapped here, in one place. Anything else is a
bug and keeps its traceback.

Imports nothing heavy: a store's exception class is looked up only if its module has
been imported, which it must have been for one of its exceptions to exist.
"""

from __future__ import annotations

import sys

# (module, class) of the stores' exception bases; each message gets its library's name.
STORE_ERRORS = (
    ("mlflow.exceptions", "MlflowException", "MLflow"),  # RestException included
    ("optuna.exceptions", "OptunaError", "Optuna"),
    ("sqlalchemy.exc", "SQLAlchemyError", "database"),
)
# Lines from which a driver's message is detail nobody needs on one line.
_DETAIL_STARTS = ("(Background on this error", "[SQL:", "[parameters:")
MAX_MESSAGE = 1000


class MnistTrackError(Exception):
    """An expected failure: its message says what is wrong and names the file, key,
    store or URI concerned (passwords masked)."""


def expected_message(error: BaseException) -> str | None:
    """The one-line message for an error the CLI expects, secrets masked; None for an
    error that is a bug (its traceback is wanted)."""
    from mnist_track.redact import redact_text

    if isinstance(error, MnistTrackError):
        return one_line(redact_text(str(error)))
    for module_name, class_name, library in STORE_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, getattr(module, class_name)):
            text = str(error) or type(error).__name__
            return f"{library}: {one_line(redact_text(text))}"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return one_line(redact_text(f"{where}{error.strerror or error}"))
    return None


def one_line(text: str) -> str:
    """A multi-line message (a driver's, say) as one line, without the trailing detail."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(_DETAIL_STARTS):
            break
        if line:
            lines.append(line)
    joined = " ".join(lines)
    return joined if len(joined) <= MAX_MESSAGE else joined[: MAX_MESSAGE - 3] + "..."
