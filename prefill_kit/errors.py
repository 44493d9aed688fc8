"""Exceptions raised by the library. Only `prefill_kit.cli` turns them into messages and exit codes."""

from __future__ import annotations


class PrefillKitError(Exception):
    """Base class: every error the library raises on purpose."""


class TemplateError(PrefillKitError):
    """A chat template could not be found, compiled or rendered."""


class TemplateSecurityError(TemplateError):
    """A chat template tried to reach Python internals; the sandbox stopped it before anything ran."""


class ConfigError(PrefillKitError):
    """A configuration value is missing, of the wrong type or out of range. The message names the key."""


class DataError(PrefillKitError):
    """A data row is unusable. Carries where it is and why, so the CLI can say `file:line: field: reason`."""

    def __init__(self, reason: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.reason = reason
        self.source = source
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = ":".join(str(p) for p in (self.source, self.line) if p is not None)
        parts = [p for p in (where, f"field {self.field!r}" if self.field else None, self.reason) if p]
        return ": ".join(parts)

    def __reduce__(self):  # pickled (from a worker process) with its location, not only its message
        return _data_error, (self.reason, self.source, self.line, self.field)

    def located(self, *, source: str | None = None, line: int | None = None) -> DataError:
        """The same error with its location filled in by the caller that knows it."""
        return DataError(self.reason, source=self.source or source,
                         line=self.line if self.line is not None else line, field=self.field)


def _data_error(reason: str, source: str | None, line: int | None, field: str | None) -> DataError:
    return DataError(reason, source=source, line=line, field=field)


class MissingExtraError(PrefillKitError):
    """A command needs an optional dependency group (e.g. `[train]`) that is not installed."""
