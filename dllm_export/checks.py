"""Field types of config objects: a count is an integer, a setting a number, a switch a bool.

numpy's scalars count as numbers; a bool is no count (`bits=True` is not 1 bit). A wrong type is an
InputError naming the field, not a TypeError from deep inside torch halfway through a run.
"""

from __future__ import annotations

import dataclasses
import numbers

from .errors import InputError


def is_int(v) -> bool:
    """An integer (numpy's too), and not a bool: `bits=True` is no bit-width."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A real number (numpy's too), and not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_fields(obj, *, ints: tuple[str, ...] = (), reals: tuple[str, ...] = (),
                 bools: tuple[str, ...] = (), strs: tuple[str, ...] = (), seqs: tuple[str, ...] = (),
                 int_seqs: tuple[str, ...] = ()) -> None:
    """InputError for the first of `obj`'s named attributes of another type (`seqs`: a list or
    tuple; `int_seqs`: one of integers). None passes where the field is optional (a dataclass field
    whose default is None; any field of another object)."""
    optional = ({f.name for f in dataclasses.fields(obj) if f.default is None} if dataclasses.is_dataclass(obj)
                else None)
    for names, ok, what in ((ints, is_int, "an integer"), (reals, is_real, "a number"),
                            (bools, lambda v: isinstance(v, bool), "true or false"),
                            (strs, lambda v: isinstance(v, str), "a name (a string)"),
                            (seqs, lambda v: isinstance(v, (list, tuple)), "a list"),
                            (int_seqs, lambda v: isinstance(v, (list, tuple)) and all(map(is_int, v)),
                             "a list of integers")):
        for name in names:
            v = getattr(obj, name)
            if v is None:
                if optional is not None and name not in optional:  # `temperature=None` failed in math
                    raise InputError(f"{name} must be {what}, got None")
            elif not ok(v):
                raise InputError(f"{name} must be {what}, got {v!r}")
