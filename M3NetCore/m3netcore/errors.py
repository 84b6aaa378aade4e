"""The errors and warnings m3netcore raises for bad input.

Every message is one line a user can act on; the CLI prints it and exits non-zero.
"""

from __future__ import annotations


class M3NetInputError(ValueError):
    """Input the core cannot use: a missing or malformed file, a point outside the CT, ..."""


class ModelFileError(M3NetInputError):
    """A model file that is truncated, corrupt, of another format version, or fails its checksum."""


class M3NetWarning(UserWarning):
    """Input the core can use but that is probably not what the user meant (e.g. not HU)."""
