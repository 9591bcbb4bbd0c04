"""Secrets out of what newsbeam logs and stores: credentials in URLs, alert target addresses."""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")


def redact_url(url: str) -> str:
    """The URL with any user:password@ replaced by ***@ (the rest kept: it says which host)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def without_userinfo(url: str) -> str:
    """The URL with any user:password@ removed."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redact_urls_in(text: str) -> str:
    """`text` (an error message, say) with the credentials of every URL in it replaced."""
    return _USERINFO.sub(r"\1***@", text)


def scrub(text: str, secrets: tuple[str, ...], replacement: str) -> str:
    """`text` with every occurrence of each secret (and of its path, which carries a webhook's
    token) replaced, for error messages that a library built from the secret."""
    for secret in secrets:
        if not secret:
            continue
        text = text.replace(secret, replacement)
        path = urlsplit(secret).path if "://" in secret else ""
        if len(path) > 1:
            text = text.replace(path, "/…")
    return text
