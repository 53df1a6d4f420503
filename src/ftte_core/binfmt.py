"""The prefix our binary containers share (updates, model files): magic, format version, flags,
JSON header length. Checked before anything else is read, so garbage is refused early and never
makes a reader allocate more than the bytes it was given."""
from __future__ import annotations

import struct
from typing import Tuple, Type, Union

PREFIX = struct.Struct("<4sHHI")  # magic, format version, flags (0), header length; little-endian


def split_prefixed(buf, what: str, magic: bytes, version: Union[int, Tuple[int, ...]], max_bytes: int,
                   max_header: int, error: Type[ValueError]) -> Tuple[memoryview, bytes, int]:
    """(the whole buffer as bytes-view, the JSON header bytes, the offset after the header).

    ``version``: the format version this side reads, or a tuple of them (the one found is
    ``PREFIX.unpack_from(mv, 0)[1]``). Every defect raises ``error`` with a one-line reason naming ``what``.
    """
    versions = (version,) if isinstance(version, int) else tuple(version)
    try:
        mv = memoryview(buf).cast("B")
    except (TypeError, ValueError):
        raise error(f"expected bytes, got {type(buf).__name__}") from None
    n = mv.nbytes
    if n > max_bytes:
        raise error(f"{what} is {n} bytes, over the limit of {max_bytes}")
    if n < PREFIX.size:
        raise error(f"{what} is {n} bytes, shorter than the {PREFIX.size}-byte prefix")
    got_magic, got_version, flags, hlen = PREFIX.unpack_from(mv, 0)
    if got_magic != magic:
        raise error(f"not a{'n' if what[0] in 'aeiou' else ''} {what}: bad magic {bytes(got_magic)!r}, expected {magic!r}")
    if got_version not in versions:
        raise error(f"unsupported {what} format version {got_version} (this side reads "
                    f"{', '.join(map(str, versions[:-1])) + ' and ' if len(versions) > 1 else ''}{versions[-1]})")
    if flags != 0:
        raise error(f"unknown {what} flags 0x{flags:04x}")
    if hlen > max_header or PREFIX.size + hlen > n:
        raise error(f"header length {hlen} does not fit the {n}-byte {what}")
    return mv, bytes(mv[PREFIX.size:PREFIX.size + hlen]), PREFIX.size + hlen
