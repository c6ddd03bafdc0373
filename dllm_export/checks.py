"""Field types of config objects: a count is an integer, a setting a number, a switch a bool.

numpy's scalars count as numbers; a bool is no count (`bits=True` is not 1 bit). A wrong type is an
InputError naming the field, not a TypeError from deep inside torch halfway through a run.
"""

from __future__ import annotations

import dataclasses
import numbers

from .errors import InputError


def check_fields(obj, *, ints: tuple[str, ...] = (), reals: tuple[str, ...] = (),
                 bools: tuple[str, ...] = (), strs: tuple[str, ...] = (), seqs: tuple[str, ...] = (),
                 int_seqs: tuple[str, ...] = ()) -> None:
    """InputError for the first of `obj`'s named attributes of another type (`seqs`: a list or
    tuple; `int_seqs`: one of integers). None passes where the field is optional (a dataclass field
    whose default is None; any field of another object)."""
    optional = ({f.name for f in dataclasses.fields(obj) if f.default is None} if dataclasses.is_dataclass(obj)
                else None)
    for names, ok, what in ((ints, lambda v: isinstance(v, numbers.Integral), "an integer"),
                            (reals, lambda v: isinstance(v, numbers.Real), "a number"),
                            (bools, lambda v: True, "true or false"),
                            (strs, lambda v: isinstance(v, str), "a name (a string)"),
                            (seqs, lambda v: isinstance(v, (list, tuple)), "a list"),
                            (int_seqs, lambda v: isinstance(v, (list, tuple)) and all(
                                isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v),
                             "a list of integers")):
        for name in names:
            v = getattr(obj, name)
            if v is None and optional is not None and name not in optional:  # `temperature=None` failed in math
                raise InputError(f"{name} must be {what}, got None")
            if v is not None and (isinstance(v, bool) != (what == "true or false") or not ok(v)):
                raise InputError(f"{name} must be {what}, got {v!r}")
