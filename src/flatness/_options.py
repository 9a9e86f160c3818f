"""Checks of kind-dependent keyword options, shared by the public functions.

A public function that forwards ``**options`` to the measurement of a
``kind`` (or whose options depend on a ``method``) calls
:func:`check_options` first, so that a caller learns at once, and before
anything runs, that an option does not apply or is misspelt, with the
public function's name in the message, never a private helper's.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


def check_options(
    function: str,
    given: Mapping[str, Any] | Iterable[str],
    valid: Iterable[str],
    *,
    choice: str,
    known: Iterable[str] = (),
) -> None:
    """Raise if an option in ``given`` is not in ``valid``.

    Parameters
    ----------
    function : str
        The public function's name as the user calls it, e.g.
        ``"flatness.sharpness"``.
    given : mapping or iterable of str
        The option names the caller passed.
    valid : iterable of str
        The options that apply to the caller's choice.
    choice : str
        The choice that decides which options apply, as the user wrote it,
        e.g. ``"kind='avg_l2'"``.
    known : iterable of str
        Options of the other choices: one of these is reported as not
        applying (``ValueError``), anything else as unknown (``TypeError``,
        with the closest valid name).

    Raises
    ------
    ValueError
        An option of another choice: names the option and the choice.
    TypeError
        An unknown option: names the function and suggests the closest name.
    """
    valid = list(valid)
    known = [k for k in known if k not in valid]
    for name in given:
        if name in valid:
            continue
        takes = ", ".join(valid) if valid else "none of these options"
        if name in known:
            raise ValueError(f"{function}: option {name}= does not apply to {choice} (it takes {takes})")
        close = difflib.get_close_matches(name, valid, n=1) or difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}=?" if close else f"; options for {choice}: {takes}"
        raise TypeError(f"{function}() got an unexpected keyword argument {name!r}{hint}")
