"""Secrets out of URLs before they reach output, params, tags, logs or error messages."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

MASK = "***"
# Query parameters that carry credentials in database and HTTP URLs.
SECRET_QUERY_KEYS = {"password", "pwd", "passwd", "secret", "token", "access_token", "api_key"}
# The password runs to the '@' that starts the host (a host holds no '@'), as SQLAlchemy's
# make_url reads it: an unencoded '@', '/', '?' or '#' in it stays masked too.
_USERINFO_PASSWORD = re.compile(
    r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]*):\S*?@(?=[^@/\s]*(?:[/?#\s]|$))"
)
# A secret query parameter anywhere in a text (a driver quoting a URL it was given), unless
# already masked. Its value runs to the next separator; a ':', ',', '.' or ')' just before
# one is the sentence's, not the value's.
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:" + "|".join(sorted(SECRET_QUERY_KEYS)) + r")=)(?!\*\*\*)"
    r"[^&#;\s'\"]*?(?=[:,.)]?(?:[&#;\s'\"]|$))",
    re.IGNORECASE,
)


def redact_url(url: str | None) -> str:
    """`url` with any password (user:password@ or ?password=) replaced by ***."""
    if not url:
        return url or ""
    masked = _USERINFO_PASSWORD.sub(rf"\g<scheme>\g<user>:{MASK}@", url, count=1)
    try:
        parts = urlsplit(masked)
    except ValueError:
        return masked
    if not parts.query:
        return masked
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(key.lower() in SECRET_QUERY_KEYS for key, _ in pairs):
        return masked
    query = urlencode(
        [(k, MASK if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*"
    )
    # Only the query is rebuilt: urlunsplit would turn sqlite:////abs into sqlite://abs.
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{masked[: masked.index('?')]}?{query}{fragment}"


def redact_text(text: str, *urls: str | None) -> str:
    """`text` with each of `urls` replaced by its redacted form, and any other
    scheme://user:password@ or ?password= left in it masked (drivers quote URLs in their
    errors)."""
    for url in urls:
        if url:
            text = text.replace(url, redact_url(url))
    text = _USERINFO_PASSWORD.sub(rf"\g<scheme>\g<user>:{MASK}@", text)
    return _QUERY_SECRET.sub(rf"\g<key>{MASK}", text)
