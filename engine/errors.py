"""The one error hierarchy of polyrec. The CLI prints ``str(error)`` on one line."""
from __future__ import annotations


class PolyrecError(Exception):
    """Base class of every error polyrec raises on purpose."""


class ConfigError(PolyrecError):
    """A setting, option or argument is wrong."""


class NotFoundError(PolyrecError):
    """A named item, user, component or artifact does not exist."""


class PluginError(PolyrecError):
    """A plugin misbehaved: bad registration, duplicate name, failed import."""


class DuplicateNameError(PluginError):
    """Two plugins registered a component under the same name."""


class ValidationError(PolyrecError):
    """Input data is malformed. Carries the file, row (1-based, header excluded) and field."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.row, self.field, self.reason = file, row, field, message
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class EncodingError(PolyrecError):
    """An encoder could not be loaded or could not encode."""


class ModelNotTrainedError(PolyrecError):
    """A request needs a trained model and there is none."""
