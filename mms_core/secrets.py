"""Credentials stay out of what MMS shows and stores: MLflow params, Prefect parameters, logs, CLI.

Fields that hold a secret are pydantic ``SecretStr``: their JSON form (which MLflow params and
Prefect's parameter store receive) is ``MASK`` and the real value is read with
``.get_secret_value()`` where it is used. This module covers the rest: plain strings that carry a
credential inside them (URLs such as ``postgresql://user:pw@host/db``) and option mappings whose
keys do not say which values are secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "**********"  # what pydantic (and so Prefect's jsonable_encoder) writes for a SecretStr
URL_MASK = "***"
# Query parameters that carry a credential: these names, and names ending like these
# (access_token, x-amz-security-token, client_secret; not tokenizer=bpe).
SECRET_QUERY_NAMES = frozenset({"pwd", "key", "sig"})
SECRET_QUERY_SUFFIXES = (
    "password",
    "passwd",
    "secret",
    "token",
    "credential",
    "signature",
    "apikey",
    "api_key",
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact_url(url: str) -> str:
    """``url`` with its password and secret query values replaced by ``***``.

    ``redis://:pw@h:6379/0`` -> ``redis://:***@h:6379/0``,
    ``postgresql://u:pw@h/db?password=x`` -> ``postgresql://u:***@h/db?password=***``. Strings that
    are not URLs (paths, names) come back unchanged.

    Args:
        url: Any string; only ``scheme://`` URLs are changed.

    Returns:
        The string to show or store instead of ``url``.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: mask everything before the host
        return re.sub(r"://[^/?#]*@", f"://{URL_MASK}@", url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{URL_MASK}@{hostport}"
    query = "&".join(_redact_query_item(item) for item in parts.query.split("&")) if parts.query else ""
    if netloc == parts.netloc and query == parts.query:
        return url  # untouched: keep the caller's exact spelling
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URL in it passed through ``redact_url``."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_mapping(mapping: Mapping[str, Any], *, public: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A copy of ``mapping`` fit to show or store: every value is ``MASK`` except those under a key
    in ``public``, which are kept (a ``SecretStr`` revealed, a URL through ``redact_url``).

    Secret by default, because option mappings (fsspec storage options, client kwargs) name their
    credentials freely: key, secret, token, sas_token, account_key, client_secret, ...

    Args:
        mapping: Options, plain or ``SecretStr`` values.
        public: Keys known to hold no secret (e.g. ``endpoint_url``).

    Returns:
        A new dict with the same keys.
    """
    return {key: _public_value(value) if key in public else MASK for key, value in mapping.items()}


def reveal(value: Any) -> Any:
    """The real value of a ``SecretStr`` (anything else as it is), for the call that needs it."""
    # Duck-typed, so this module imports no pydantic: the CLI imports it before `--help` answers.
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def _public_value(value: Any) -> Any:
    value = reveal(value)
    return redact_url(value) if isinstance(value, str) else value


def _redact_query_item(item: str) -> str:
    name, eq, _ = item.partition("=")
    key = unquote(name).lower()
    secret = key in SECRET_QUERY_NAMES or key.endswith(SECRET_QUERY_SUFFIXES)
    return f"{name}={URL_MASK}" if eq and secret else item
