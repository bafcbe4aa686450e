"""Cleaning AG News text: its lost HTML escapes, backslash line breaks, control characters, whitespace.

`clean_text(s)` returns the cleaned text and a Counter of what it changed (reported in meta.json).
"""
from __future__ import annotations

import html
import re
from collections import Counter


# AG News lost the "&" of its HTML escapes (it became a space: "world #39;s", "the  #36;10"); some rows
# keep it ("&lt;TXN.N&gt;"). Named escapes are matched only from a short list and not after a letter,
# so "Camp;" or "and;" stay as they are.
_NAMED = ("quot", "amp", "lt", "gt", "apos", "nbsp", "hellip", "mdash", "ndash", "lsquo", "rsquo", "ldquo",
          "rdquo", "sbquo", "bdquo", "laquo", "raquo", "pound", "euro", "cent", "yen", "copy", "reg", "trade",
          "deg", "middot", "bull", "eacute", "egrave", "aacute", "agrave", "oacute", "uacute", "iacute",
          "ntilde", "ccedil", "uuml", "ouml", "auml", "szlig")
# An escape ends at a ";": the text is split there and the end of each piece is matched (fast: no scan of
# the whole text for a pattern with an optional first character).
_ESCAPE_AT_END = re.compile(r"(?:&| )?(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|(?<![A-Za-z0-9])(?:"
                            + "|".join(_NAMED) + r"))\Z")
_BACKSLASH_DOLLAR = re.compile(r"\\(?=\$)")  # "\$11 billion": an escaped dollar sign, not a line break
_BACKSLASHES = re.compile(r"\\+")  # AG News wrote line breaks as backslashes
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")
_ESCAPE_CACHE: dict[str, str | None] = {}


def _unescape(token: str) -> str | None:
    """The character an escape ("#39;", "quot;") stands for, or None to leave it as written."""
    if token not in _ESCAPE_CACHE:
        ch = html.unescape("&" + token)  # numeric 128-159 decode as Windows-1252, as browsers do ("#151;" -> em dash)
        ok = len(ch) == 1 and ch != "\ufffd" and (ch.isprintable() or ch == "\xa0")
        if ok and token.startswith("#") and ord(ch) < 128:
            ok = not ch.isalnum()  # "#1;" or "#100;" in running text is not an escape for "\x01" or "d"
        _ESCAPE_CACHE[token] = ch if ok else None
    return _ESCAPE_CACHE[token]


def _unescape_all(s: str, counts: Counter) -> str:
    """Replace each escape ("#39;", " quot;", "&lt;") by its character, with the "&" or the space that stood
    for it; "amp;" right before another escape is a double escape ("amp;apos;" -> "'")."""
    pieces = s.split(";")
    out = []
    amp_pending = False  # the previous piece ended in an "amp" escape, not yet written
    for i, piece in enumerate(pieces[:-1]):
        m = _ESCAPE_AT_END.search(piece[-12:])  # the longest escape with its "&" is 9 characters
        ch = _unescape(m.group(1) + ";") if m else None
        if amp_pending:
            if ch is not None and m.start() == 0 and len(m.group(0)) == len(piece):
                counts["double_escape"] += 1  # "&amp;apos;" is "&apos;"
            else:
                out.append("&")
                counts["amp;"] += 1
            amp_pending = False
        if ch is None:
            out.append(piece + ";")
            continue
        out.append(piece[:len(piece) - len(m.group(0))])
        if m.group(1) == "amp":
            amp_pending = True
            continue
        counts[m.group(1) + ";"] += 1
        out.append(ch)
    if amp_pending:
        out.append("&")
        counts["amp;"] += 1
    out.append(pieces[-1])
    return "".join(out)


def clean_text(s: str, *, line_breaks: str = "space") -> tuple[str, Counter]:
    """Undo AG News escapes and normalise whitespace.

    `#36;` -> `$`, `#39;` -> `'`, `quot;` -> `"`, `&lt;`/`&gt;`/`&amp;`, numeric escapes generally (`#151;`
    -> em dash), backslash line breaks -> a space or a newline, `\\$` -> `$`; runs of whitespace become
    one space (one newline between lines where line_breaks="newline"), and the ends are stripped.

    Args:
        s: the raw text.
        line_breaks: "space" or "newline": what a backslash line break becomes.

    Returns:
        (cleaned text, counts of what was cleaned, keyed by the escape as written without its "&" --
        "#39;", "quot;" -- or by kind: "backslash_line_break", "backslash_dollar", "double_escape"
        ("amp;quot;"), "control_char",
        "whitespace" (1 per text whose whitespace changed)).
    """
    counts: Counter = Counter()
    if "\\" in s:
        s, n = _BACKSLASH_DOLLAR.subn("", s)
        if n:
            counts["backslash_dollar"] += n
        s, n = _BACKSLASHES.subn("\n" if line_breaks == "newline" else " ", s)
        if n:
            counts["backslash_line_break"] += n
    if ";" in s:
        s = _unescape_all(s, counts)
    if not s.isprintable():
        s, n = _CONTROL.subn(" ", s)
        if n:
            counts["control_char"] += n
    if line_breaks == "newline":
        out = "\n".join(line for line in (" ".join(part.split()) for part in s.split("\n")) if line)
    else:
        out = " ".join(s.split())
    if out != s:
        counts["whitespace"] += 1
    return out, counts
