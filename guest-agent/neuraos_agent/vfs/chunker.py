"""Split a file's text into chunks by format, so each embedding covers one coherent piece.

MiniLM was trained on ~128-token passages and truncates at 256, so long text is cut into
sentence-aligned windows of about `max_words` words. Each chunk carries a `context` (the document
title or heading path, a CSV header, a code file's name) that is prepended when embedding: a
passage of an abstract means more next to its title. Offsets are character offsets into the
decoded text, so a search hit points at the place in the file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import PurePath

MAX_WORDS = 128
MAX_FILE_BYTES = 32 * 1024 * 1024  # larger files are stored but not indexed

CODE_SUFFIXES = frozenset({
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".kt", ".js", ".ts",
    ".tsx", ".jsx", ".rb", ".php", ".sh", ".bash", ".lua", ".swift", ".scala", ".cs", ".sql", ".toml",
    ".yaml", ".yml", ".ini", ".cfg",
})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown", ".rst"})

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'])")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_BOUNDARY = re.compile(r"^(def |class |async def |fn |func |function |pub |impl |struct |interface |export )")


@dataclass(frozen=True)
class Chunk:
    offset: int  # character offset of `text` in the decoded file
    text: str
    context: str = ""

    @property
    def embed_text(self) -> str:
        """What the embedder sees (and what the content hash covers)."""
        return f"{self.context}\n{self.text}" if self.context else self.text


@dataclass(frozen=True)
class Chunker:
    max_words: int = MAX_WORDS

    def chunk_file(self, path: PurePath | str, data: bytes) -> list[Chunk]:
        """Chunks of a file's bytes; binary or oversized files give none (they stay plain files)."""
        suffix = PurePath(path).suffix.lower()
        if len(data) > MAX_FILE_BYTES:
            return []
        if suffix == ".pdf":
            return self.chunk_text(_pdf_text(data))
        text = _decode(data)
        if text is None or not text.strip():
            return []
        if suffix in MARKDOWN_SUFFIXES:
            return self.chunk_markdown(text)
        if suffix == ".json":
            return self.chunk_json(text)
        if suffix in (".csv", ".tsv"):
            return self.chunk_table(text, "\t" if suffix == ".tsv" else ",")
        if suffix in CODE_SUFFIXES:
            return self.chunk_code(text, PurePath(path).name)
        return self.chunk_text(text)

    def chunk_text(self, text: str, base: int = 0, context: str = "") -> list[Chunk]:
        """Paragraphs packed into windows of at most `max_words`; long paragraphs split at sentences."""
        return self._pack(_spans(text, _SENTENCE_END, base), context)

    def chunk_markdown(self, text: str) -> list[Chunk]:
        """Sections under headings; each chunk's context is its heading path (the title first)."""
        chunks: list[Chunk] = []
        path: list[str] = []
        body_start = 0

        def flush(end: int) -> None:
            body = text[body_start:end]
            if body.strip():
                chunks.extend(self.chunk_text(body, body_start, " / ".join(path)))

        for m in re.finditer(r"^.*$", text, re.M):
            h = _HEADING.match(m.group())
            if not h:
                continue
            flush(m.start())
            level = len(h.group(1))
            path = path[: level - 1] + [h.group(2)]
            body_start = m.end()
        flush(len(text))
        if not chunks and path:  # headings only
            chunks.append(Chunk(0, text.strip()))
        return chunks

    def chunk_code(self, text: str, name: str) -> list[Chunk]:
        """Blocks that start at top-level definitions, packed up to `max_words`; context is the file name."""
        pieces: list[tuple[int, str]] = []
        pos = 0
        block_start = 0
        for line in text.splitlines(keepends=True):
            if pos > block_start and _CODE_BOUNDARY.match(line):
                pieces.append((block_start, text[block_start:pos]))
                block_start = pos
            pos += len(line)
        pieces.append((block_start, text[block_start:]))
        return self._pack([p for p in pieces if p[1].strip()], name, split_long=True)

    def chunk_json(self, text: str) -> list[Chunk]:
        """Leaves flattened to `key.path: value` lines; invalid JSON falls back to plain text."""
        try:
            doc = json.loads(text)
        except ValueError:
            return self.chunk_text(text)
        lines = [f"{k}: {v}" for k, v in _flatten(doc, "")]
        flat = "\n".join(lines)
        # offsets of flattened lines do not map back into the file: point every chunk at 0
        return [Chunk(0, c.text, c.context) for c in self._pack(_lines(flat), "")]

    def chunk_table(self, text: str, delimiter: str) -> list[Chunk]:
        """Rows packed with the header as context, so every chunk says what its columns mean."""
        first_nl = text.find("\n")
        if first_nl < 0:
            return self.chunk_text(text)
        header = next(csv.reader(io.StringIO(text[:first_nl]), delimiter=delimiter), [])
        return self._pack(_lines(text[first_nl + 1:], first_nl + 1), delimiter.join(header))

    def _pack(self, pieces: list[tuple[int, str]], context: str, split_long: bool = False) -> list[Chunk]:
        """Consecutive pieces joined into chunks of at most `max_words`; a short tail joins the last."""
        if split_long:
            pieces = [sub for start, piece in pieces
                      for sub in (_lines(piece, start) if len(piece.split()) > self.max_words else [(start, piece)])]
        groups: list[tuple[int, str, int]] = []  # (start, raw text, words)
        for start, piece in pieces:
            words = len(piece.split())
            if groups and groups[-1][2] + words <= self.max_words:
                g_start, g_text, g_words = groups[-1]
                if g_start + len(g_text) == start:  # contiguous: keep offsets exact
                    groups[-1] = (g_start, g_text + piece, g_words + words)
                    continue
            groups.append((start, piece, words))
        if len(groups) > 1 and groups[-1][2] < self.max_words // 3:
            (a_start, a_text, a_words), (b_start, b_text, b_words) = groups[-2], groups[-1]
            if a_start + len(a_text) == b_start:
                groups[-2:] = [(a_start, a_text + b_text, a_words + b_words)]
        return [c for start, raw, _ in groups if (c := _stripped(start, raw, context)) is not None]


def _stripped(start: int, raw: str, context: str) -> Chunk | None:
    text = raw.strip()
    if not text:
        return None
    return Chunk(start + (len(raw) - len(raw.lstrip())), text, context)


def _spans(text: str, boundary: re.Pattern[str], base: int = 0) -> list[tuple[int, str]]:
    """Sentences (and paragraphs), each keeping its trailing whitespace so offsets stay exact."""
    out: list[tuple[int, str]] = []
    for para in re.finditer(r"(?s).+?(?:\n[ \t]*\n\s*|$)", text):
        pos = para.start()
        for m in boundary.finditer(text, para.start(), para.end()):
            out.append((base + pos, text[pos:m.end()]))
            pos = m.end()
        if pos < para.end():
            out.append((base + pos, text[pos:para.end()]))
    return [(o, p) for o, p in out if p]


def _lines(text: str, base: int = 0) -> list[tuple[int, str]]:
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        if line.strip():
            out.append((base + pos, line))
        pos += len(line)
    return out


def _flatten(value: object, prefix: str) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list):
        return [kv for i, v in enumerate(value) for kv in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix or "value", value)]


def _decode(data: bytes) -> str | None:
    """UTF-8 text, or None for binary data (a NUL in the first 8 KiB, or undecodable)."""
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _pdf_text(data: bytes) -> str:
    """Text of a PDF where pypdf is installed; an unreadable PDF gives no text, not an error."""
    try:
        from pypdf import PdfReader
    except ImportError:
        return ""
    try:
        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception:  # noqa: BLE001 - a malformed PDF is just not indexed
        return ""
