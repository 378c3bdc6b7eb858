"""The lctriton container: a safe, versioned, checksummed file of coded tensors.

Layout (all integers little-endian; ``docs/format.md`` is the full specification)::

    offset 0    header, 64 bytes
                  magic         8s   b"\\x89LCT\\r\\n\\x1a\\n"
                  major         u16  format major version (2; readers also take 1)
                  minor         u16  format minor version (0)
                  flags         u32  0
                  reserved      48s  zeros
    offset 64   sections, each starting on a 64-byte boundary, zero padding between
    ...         index: a JSON object (tree, tensor records, section table, metadata); in
                version 2 a zlib stream (RFC 1950) of its ASCII text, in version 1 the text
    end - 32    footer, 32 bytes
                  index_offset  u64
                  index_length  u64
                  index_crc32   u32  CRC-32 of the index bytes
                  footer_crc32  u32  CRC-32 of the 20 bytes before it
                  end_magic     8s   b"LCTEND\\r\\n"

The index is written after the sections so that a container streams out in one pass; the
footer tells a reader where it is, and its length and CRC-32 are those of the stored (in
version 2, deflated) bytes. Deflating the index is version 2's only change: on small and
delta checkpoints the index's chunk tables and symbol frequencies are a tenth of the file,
and zlib takes three quarters of that away. Reading checks every size against the file length
before it allocates anything, and every section against its CRC-32 before it is decoded.
Nothing here unpickles: JSON and raw little-endian arrays are all a file can hold.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterable
from typing import Any, BinaryIO

import numpy as np

from lctriton.errors import ChecksumError, FormatError, TruncatedError, VersionError

__all__ = [
    "MAGIC",
    "END_MAGIC",
    "MAJOR_VERSION",
    "MINOR_VERSION",
    "READABLE_MAJORS",
    "HEADER_SIZE",
    "FOOTER_SIZE",
    "ALIGN",
    "Container",
    "write_container",
    "rewrite_container",
    "read_container",
    "open_container",
]

MAGIC = b"\x89LCT\r\n\x1a\n"
END_MAGIC = b"LCTEND\r\n"
#: The version this writer produces by default.
MAJOR_VERSION = 2
MINOR_VERSION = 0
#: The majors this reader reads: 1 (plain JSON index) and 2 (deflated JSON index).
READABLE_MAJORS = (1, 2)
HEADER_SIZE = 64
FOOTER_SIZE = 32
ALIGN = 64
#: Largest index a reader accepts, stored or inflated, whatever the file size: a guard
#: against absurd lengths and against deflate streams that expand without bound.
MAX_INDEX_BYTES = 256 << 20
#: A version 2 index inflates to at most this many times its stored length, plus
#: :data:`INFLATE_SLACK`: real indexes deflate 3-10x, so this keeps the text (and the parsed
#: JSON) of a small file small, as they are for a version 1 file, whose text is its bytes.
MAX_INFLATE_RATIO = 64
INFLATE_SLACK = 1 << 20
#: zlib level of a version 2 index (zlib's default: level 9 saves under 1% more on indexes).
INDEX_DEFLATE_LEVEL = 6

_HEADER = struct.Struct("<8sHHI48s")
_FOOTER = struct.Struct("<QQII8s")


def _crc(data: Any, value: int = 0) -> int:
    return zlib.crc32(data, value) & 0xFFFFFFFF


def _pad(n: int, align: int) -> int:
    return -n % align


def check_version(version: object) -> int:
    """``version`` as a container major this module writes.

    Raises:
        ValueError: If it is not one of :data:`READABLE_MAJORS`.
    """
    if isinstance(version, bool) or version not in READABLE_MAJORS:
        raise ValueError(f"format_version must be one of {list(READABLE_MAJORS)}, got {version!r}")
    return int(version)


def write_container(
    out: BinaryIO,
    index: dict[str, Any],
    sections: Iterable[list[np.ndarray]],
    version: int = MAJOR_VERSION,
) -> int:
    """Write a container to a binary stream in one pass.

    Args:
        out: Writable binary stream; it is not seeked.
        index: JSON-serializable index; its ``"sections"`` entry is filled in here.
        sections: For each section, the arrays written back to back, each padded to 8 bytes.
        version: Container major: 2 deflates the index, 1 writes it as plain JSON for
            readers older than version 2 (the sections are the same bytes in both).

    Returns:
        The number of bytes written.

    Raises:
        ValueError: If ``version`` is not one this module writes.
    """
    version = check_version(version)
    out.write(_HEADER.pack(MAGIC, version, MINOR_VERSION, 0, bytes(48)))
    offset = HEADER_SIZE
    table = []
    zeros = bytes(ALIGN)
    for parts in sections:
        crc = 0
        length = 0
        for part in parts:
            data = memoryview(np.ascontiguousarray(part)).cast("B")
            out.write(data)
            crc = _crc(data, crc)
            pad = _pad(data.nbytes, 8)
            if pad:
                out.write(zeros[:pad])
                crc = _crc(zeros[:pad], crc)
            length += data.nbytes + pad
        table.append([offset, length, crc])
        offset += length
        pad = _pad(offset, ALIGN)
        out.write(zeros[:pad])
        offset += pad
    index = dict(index, sections=table)
    # ASCII with escapes: any Python str (lone surrogates included) survives the round trip.
    blob = json.dumps(index, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    if version >= 2:
        blob = zlib.compress(blob, INDEX_DEFLATE_LEVEL)
    out.write(blob)
    index_offset = offset
    offset += len(blob)
    body = struct.pack("<QQI", index_offset, len(blob), _crc(blob))
    out.write(_FOOTER.pack(index_offset, len(blob), _crc(blob), _crc(body), END_MAGIC))
    return offset + FOOTER_SIZE


class Container:
    """A parsed container: its index and access to its sections.

    Attributes:
        index: The decoded JSON index (its structure is checked by the readers of each part;
            the section table is checked here).
        size: Total bytes.
        version: The file's ``(major, minor)``.
        index_text: The index's JSON text as the file holds it (inflated in version 2);
            :func:`read_container` sets it, and :func:`rewrite_container` copies it.
    """

    def __init__(
        self,
        buffer: Any,
        index: dict[str, Any],
        size: int,
        keepalive: Any = None,
        version: tuple[int, int] = (MAJOR_VERSION, MINOR_VERSION),
        index_text: bytes | None = None,
    ) -> None:
        self._buffer = memoryview(buffer)
        self.index = index
        self.size = size
        self.version = version
        self.index_text = index_text
        self._keepalive = keepalive
        self._verified: set[int] = set()

    @property
    def num_sections(self) -> int:
        return len(self.index["sections"])

    def section(self, i: int, verify: bool = True) -> memoryview:
        """The bytes of section ``i``, checked against its CRC-32.

        Raises:
            FormatError: If ``i`` is not a section of this container.
            ChecksumError: If the bytes do not match the recorded checksum.
        """
        sections = self.index["sections"]
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(sections):
            raise FormatError(f"section {i!r} does not exist (the container has {len(sections)})")
        offset, length, crc = sections[i]
        view = self._buffer[offset : offset + length]
        if verify and i not in self._verified:
            if _crc(view) != crc:
                raise ChecksumError(f"section {i} (bytes {offset}..{offset + length}) fails its CRC-32 check")
            self._verified.add(i)
        return view

    def close(self) -> None:
        """Release the memory map, if any. Tensors already decoded stay valid."""
        self._buffer.release()
        if self._keepalive is not None:
            try:
                self._keepalive.close()
            except BufferError:  # a section view is still referenced; closed when freed
                pass
            self._keepalive = None


def read_container(buffer: Any, keepalive: Any = None) -> Container:
    """Parse and validate a container held in memory (bytes, bytearray, mmap, memoryview).

    Raises:
        TruncatedError: If the data ends before a structure it declares.
        VersionError: If the major version is not one this reader knows.
        ChecksumError: If the footer or the index fails its checksum.
        FormatError: For any other inconsistency, naming it.
    """
    view = memoryview(buffer).cast("B") if not isinstance(buffer, mmap.mmap) else memoryview(buffer)
    size = view.nbytes
    if size < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
        raise FormatError("not an lctriton container: the magic bytes at offset 0 are wrong")
    if size < HEADER_SIZE + FOOTER_SIZE:
        raise TruncatedError(f"container is truncated: {size} bytes, the minimum is {HEADER_SIZE + FOOTER_SIZE}")
    _, major, minor, flags, reserved = _HEADER.unpack(view[:HEADER_SIZE])
    if major not in READABLE_MAJORS:
        raise VersionError(
            f"container format version {major}.{minor} is not supported (this reader reads "
            f"{' and '.join(f'{m}.x' for m in READABLE_MAJORS)})"
        )
    if flags != 0:
        raise FormatError(f"unknown header flags 0x{flags:08x}")
    if reserved != bytes(len(reserved)):
        raise FormatError("the header's reserved bytes are not zero")
    index_offset, index_length, index_crc, footer_crc, end_magic = _FOOTER.unpack(view[size - FOOTER_SIZE :])
    if end_magic != END_MAGIC:
        raise TruncatedError("container is truncated or has trailing bytes: its footer is missing")
    if _crc(view[size - FOOTER_SIZE : size - FOOTER_SIZE + 20]) != footer_crc:
        raise ChecksumError("the container's footer fails its CRC-32 check")
    if not HEADER_SIZE <= index_offset <= size - FOOTER_SIZE or index_length != size - FOOTER_SIZE - index_offset:
        raise FormatError(
            f"index at {index_offset} (+{index_length} bytes) does not end where the footer of the {size}-byte container starts"
        )
    if index_length > MAX_INDEX_BYTES:
        raise FormatError(f"index of {index_length} bytes exceeds the limit of {MAX_INDEX_BYTES}")
    blob = view[index_offset : index_offset + index_length]
    if _crc(blob) != index_crc:
        raise ChecksumError("the container's index fails its CRC-32 check")
    if major >= 2:
        text = _inflate_index(blob, min(MAX_INDEX_BYTES, index_length * MAX_INFLATE_RATIO + INFLATE_SLACK))
    else:
        text = bytes(blob)
    try:
        index = json.loads(text.decode("utf-8"), parse_constant=_reject_constant,
                           object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"the container's index is not valid JSON: {exc}") from None
    if not isinstance(index, dict):
        raise FormatError("the container's index is not a JSON object")
    sections = index.get("sections")
    if not isinstance(sections, list):
        raise FormatError("the container's index has no section table")
    end = HEADER_SIZE
    for i, entry in enumerate(sections):
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entry)
        ):
            raise FormatError(f"section {i}: entry {entry!r} is not [offset, length, crc32]")
        offset, length, crc = entry
        if crc > 0xFFFFFFFF:
            raise FormatError(f"section {i}: checksum {crc} does not fit in 32 bits")
        if offset % ALIGN:
            raise FormatError(f"section {i}: offset {offset} is not a multiple of {ALIGN}")
        if offset < end or offset + length > index_offset:
            raise FormatError(
                f"section {i}: bytes {offset}..{offset + length} overlap another part of the container"
            )
        end = offset + length
    return Container(view, index, size, keepalive, (major, minor), text)


def rewrite_container(container: Container, out: BinaryIO, version: int) -> int:
    """Write ``container`` to ``out`` in container major ``version``: the same header but for
    the major, the same sections at the same offsets, the same index text (deflated for
    version 2) and a new footer. Nothing is parsed or serialized again, so the index is
    kept exactly as written; every section is checked against its CRC-32 first.

    Returns:
        The number of bytes written.

    Raises:
        ValueError: If ``version`` is not one this module writes.
        ChecksumError: If a section fails its checksum (before anything is written).
    """
    version = check_version(version)
    for i in range(container.num_sections):
        container.section(i)
    view = container._buffer  # noqa: SLF001 (the bytes this container was read from)
    index_offset = _FOOTER.unpack(view[container.size - FOOTER_SIZE :])[0]
    text = container.index_text
    if text is None:
        raise ValueError("rewrite_container needs a container read from bytes (its index text)")
    blob = zlib.compress(text, INDEX_DEFLATE_LEVEL) if version >= 2 else text
    out.write(view[:8])
    out.write(struct.pack("<H", version))
    out.write(view[10:index_offset])
    out.write(blob)
    body = struct.pack("<QQI", index_offset, len(blob), _crc(blob))
    out.write(_FOOTER.pack(index_offset, len(blob), _crc(blob), _crc(body), END_MAGIC))
    return index_offset + len(blob) + FOOTER_SIZE


def _inflate_index(blob: memoryview, limit: int) -> bytes:
    """The JSON text of a version 2 index: one complete zlib stream, inflated to at most
    ``limit`` bytes (checked while inflating, so a stream that expands without bound stops
    there), with nothing after it."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(blob, limit)
    except zlib.error as exc:
        raise FormatError(f"the container's index is not a valid zlib stream: {exc}") from None
    if inflater.unconsumed_tail or (not inflater.eof and len(text) >= limit):
        raise FormatError(
            f"the container's index inflates past the limit of {limit} bytes "
            f"({MAX_INFLATE_RATIO}x its {len(blob)} stored bytes plus {INFLATE_SLACK}, at most {MAX_INDEX_BYTES})"
        )
    if not inflater.eof:
        raise FormatError("the container's index ends inside its zlib stream")
    if inflater.unused_data:
        raise FormatError(f"{len(inflater.unused_data)} bytes follow the zlib stream of the container's index")
    return text


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in the index (strict JSON only)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def open_container(path: str | os.PathLike[str]) -> Container:
    """Memory-map a container file and parse it (see :func:`read_container`).

    Raises:
        FileNotFoundError: If the file does not exist.
        FormatError: As :func:`read_container`.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise TruncatedError(f"{os.fspath(path)!r} is empty")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return read_container(mapped, keepalive=mapped)
    except BaseException:
        try:
            mapped.close()
        except BufferError:  # views held by the traceback; the map closes when they go
            pass
        raise
