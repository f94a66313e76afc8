"""Remote cache URLs: the one check every source of a URL goes through (the recipe's `cache.remote`,
$OPTFORGE_REMOTE, `--remote`), and the one way a URL is printed. Pure: no fsspec here (which protocol
is installed is `optforge.remote`'s question, asked when the remote is opened).

A URL is an fsspec URL (`s3://bucket/prefix`, `gs://bucket/prefix`, `file:///abs/path`,
`ssh://host/path`), one filesystem (no `a::b` chains), and carries no secret: no password and no
query string. Credentials come from where fsspec's backends read them (AWS_* variables, ~/.aws,
gcloud's application default credentials, ~/.ssh), so that a URL can sit in a recipe, a log line or a
report without leaking anything.
"""

from __future__ import annotations

import re
from typing import Optional

# what turns the remote off where a recipe sets one (OPTFORGE_REMOTE=none, --remote none)
OFF = ("none", "off")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
# protocols whose PUT is atomic (an object is all there or absent): blobs go straight to their name
ATOMIC_PUT = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl")


def parse_remote(url: str) -> tuple[str, str]:
    """`url` -> (protocol, rest) after the checks above; ValueError with the fix otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("a remote cache URL is empty; give one such as s3://bucket/prefix")
    url = url.strip()
    if "::" in url:
        raise ValueError(f"{redact(url)!r} chains filesystems (::); give one URL such as s3://bucket/prefix")
    m = _SCHEME.match(url)
    if not m:
        raise ValueError(f"{redact(url)!r} is not a URL; give one such as s3://bucket/prefix, gs://bucket/prefix, "
                         "file:///absolute/path or ssh://host/path")
    protocol, rest = m.group(1).lower(), m.group(2)
    if "?" in rest or "#" in rest:
        raise ValueError(f"{redact(url)!r} has a query string or fragment; options and credentials belong in "
                         "the environment (AWS_* variables, ~/.aws, ~/.ssh), not the URL")
    authority = rest.split("/", 1)[0]
    if "@" in authority and ":" in authority.rsplit("@", 1)[0]:
        raise ValueError(f"{redact(url)!r} carries a password; put credentials where the backend reads them "
                         "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an ssh key), not in the URL")
    if protocol in ("file", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"{redact(url)!r}: a file remote needs an absolute path: file:///absolute/path")
    elif not authority or authority.endswith("@"):
        raise ValueError(f"{redact(url)!r} names no bucket or host; give one such as {protocol}://bucket/prefix")
    return protocol, rest.rstrip("/") or "/"


def check_remote(url: str) -> str:
    """The URL as optforge keeps it (trailing slashes dropped), or ValueError."""
    protocol, rest = parse_remote(url)
    return f"{protocol}://{rest}"


def redact(url: Optional[str]) -> str:
    """`url` fit for a log line, an error or a report: no userinfo (user, password), no query string, no
    fragment (the checks refuse passwords and queries, and this keeps them out of the message that refuses
    them)."""
    if not url:
        return ""
    text = str(url).split("#", 1)[0].split("?", 1)[0]
    m = _SCHEME.match(text)
    if not m:
        return text
    authority, sep, path = m.group(2).partition("/")
    authority = authority.rsplit("@", 1)[-1]  # no userinfo at all: a user name says who, not where
    return f"{m.group(1)}://{authority}{sep}{path}"
