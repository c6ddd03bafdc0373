"""Field types of config objects: a count is an integer, a setting a number, a switch a bool.

numpy's scalars count as numbers; a bool is no count (`bits=True` is not 1 bit). A wrong type is an
InputError naming the field, not a TypeError from deep inside torch halfway through a run.
"""

from __future__ import annotations

import numbers

from .errors import InputError


def check_fields(obj, *, ints: tuple[str, ...] = (), reals: tuple[str, ...] = (),
                 bools: tuple[str, ...] = ()) -> None:
    """InputError for the first of `obj`'s named attributes (None passes) of another type."""
    for names, ok, what in ((ints, lambda v: isinstance(v, numbers.Integral), "an integer"),
                            (reals, lambda v: isinstance(v, numbers.Real), "a number"),
                            (bools, lambda v: True, "true or false")):
        for name in names:
            v = getattr(obj, name)
            if v is not None and (isinstance(v, bool) != (what == "true or false") or not ok(v)):
                raise InputError(f"{name} must be {what}, got {v!r}")
