"""User-facing errors. The CLI prints them as one line and exits with code 2."""


class DllmExportError(Exception):
    """Base class of every error caused by bad input (files, arguments, ids)."""


class CheckpointError(DllmExportError):
    """A checkpoint folder is missing, truncated, inconsistent or of an unknown architecture."""


class InputError(DllmExportError):
    """Bad arguments to a library call: ids out of range, a prompt too long, a bad schedule."""


class CalibrationError(DllmExportError):
    """Calibration data cannot drive a PTQ method on a layer (a Hessian that cannot be factorised)."""
