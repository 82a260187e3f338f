"""Credentials that ride in URIs, kept out of everything a run stores or prints.

`redact` hides them in text. `s3_keys_to_env` takes an S3 key pair out of a storage URI
(`s3://KEY:SECRET@bucket/path`, the form pyarrow accepts) into AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY of this process, where pyarrow (Ray Tune's storage) and LanceDB read S3
credentials from and which a private Ray's trial processes inherit; the URI that remains
(`s3://bucket/path`) is what spec.json, sweep_state.json and Tune's pickled state keep. Any other
credential in such a URI (a password on another scheme, `?token=`, a signed URL) is refused in one
line: it cannot be stored safely, and the environment is the place to give it.
"""

from __future__ import annotations

import logging
import os
import re
from typing import NoReturn
from urllib.parse import unquote

from embedtune.errors import EmbedtuneError

log = logging.getLogger(__name__)

# `scheme://user:password@host` and secret query parameters (`?token=`, `&X-Amz-Signature=`, ...).
URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s\"']+):[^@/\s\"']+@")
URI_SECRET_PARAM = re.compile(
    r"(?i)(?P<head>[?&][\w.-]*(?:token|password|passwd|secret|signature|credential|api[_-]?key|access[_-]?key)"
    r"[\w.-]*=)[^&\s\"']+"
)
_S3_USERINFO = re.compile(r"^(?P<scheme>s3a?)://(?P<key>[^:/@\s]+):(?P<secret>[^@/\s]+)@(?P<rest>.*)$")


def redact(text: str) -> str:
    """`text` with URI passwords and secret query parameters replaced by `***`."""
    text = URI_PASSWORD.sub(lambda m: f"{m['head']}:***@", str(text))
    return URI_SECRET_PARAM.sub(lambda m: f"{m['head']}***", text)


def has_credentials(text: str) -> bool:
    return redact(text) != text


def refuse(location: str, what: str) -> NoReturn:
    """The one line for a credential embedtune cannot keep out of what it stores."""
    raise EmbedtuneError(
        f"{what} {redact(location)} carries a credential, which would be stored with the run (spec.json, "
        "sweep_state.json, Tune's state): give it through the environment instead (for s3://, "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; for a hub dataset, HF_TOKEN)"
    )


def check_source(source: str, what: str) -> None:
    """A dataset source (a sample, a local file, `hf:<id>`) never needs a credential: refuse one."""
    if has_credentials(source):
        refuse(source, what)


def s3_keys_to_env(location: str | None, what: str) -> str | None:
    """`location` as it may be stored (see the module docstring); `what` names it in errors."""
    if not location or not has_credentials(location):
        return location
    match = _S3_USERINFO.match(location)
    if not match or has_credentials(match["rest"]):
        refuse(location, what)
    os.environ.update(AWS_ACCESS_KEY_ID=unquote(match["key"]), AWS_SECRET_ACCESS_KEY=unquote(match["secret"]))
    log.info("the S3 keys in %s are used from the environment (AWS_ACCESS_KEY_ID), not stored", what)
    return f"{match['scheme']}://{match['rest']}"


def s3_keys_of(location: str | None) -> tuple[str, str] | None:
    """The (key, secret) pair in an `s3://KEY:SECRET@...` location, if any."""
    match = _S3_USERINFO.match(location or "")
    return (unquote(match["key"]), unquote(match["secret"])) if match else None
