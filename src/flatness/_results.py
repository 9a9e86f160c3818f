"""The one result mixin: ``to_dict`` / ``to_json`` for every result
dataclass of the library."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from torch import Tensor


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ResultMixin:
    """``to_dict`` / ``to_json`` for result dataclasses (mix into a
    ``@dataclass``).

    ``to_dict`` turns tensors into (nested) lists and leaves out the fields
    named in ``_skip`` (such as eigenvectors); override it for fields JSON
    cannot hold otherwise.
    """

    _skip: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of the result's fields."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in self._skip}  # type: ignore[arg-type]

    def to_json(self, path: str | None = None, *, indent: int = 2) -> str:
        """The result as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, default=str)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text
