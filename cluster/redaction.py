"""What counts as a secret in a run's settings, and the one rule that blanks it before anything is written.

Usage::

    safe = redacted(to_dict(cfg, redact=False))   # what config.json, checkpoints, W&B and error messages get

A setting, query parameter or environment variable is a secret when its name says so (``is_secret_name``); its
value, URL userinfo and every occurrence of a secret environment variable's value become ``REDACTED``.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"

# A setting is a secret when its name says so: password, secret, credential(s), signature, authorization or cookie
# (alone or as the last word), an api / access / secret / private / client / signing key, a token named for what
# it authorises (auth_token, access_token, hf_token, x-amz-security-token, ...) or a setting called just "token".
# Not every name containing "token" or "key": the judge's yes_token / no_token are answer words, max_tokens is a
# length and a reward spec's "key" is its label; redacting those would break a checkpoint's config for nothing.
_SECRET_NAME = re.compile(
    r"(^|_)(password|passwd|passphrase|secret|credentials?|signature|authorization|cookie)$"
    r"|(^|_)(api|access|secret|private|client|signing)_?key$"
    r"|(^|_)(auth|access|api|bearer|refresh|session|security|id|hf|wandb|ray)_?token$"
    r"|^token$"
)
# scheme://userinfo@host: the userinfo (user, or user:password, or a token in the user's place) is a credential.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@\s]+@")
# name=value pairs of a URL's query (presigned object-store URLs carry X-Amz-Signature, X-Amz-Credential, ...).
_URL_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&#;?\s]+)=(?P<value>[^&#;\s]*)")
# Shorter environment values are too likely to occur in ordinary settings to be blanked wherever they appear.
_MIN_ENV_SECRET = 8


def is_secret_name(name: str) -> bool:
    """Whether a setting, query parameter or environment variable called ``name`` holds a secret (the rule above;
    camelCase, dashes and dots count as word breaks: ``apiKey``, ``X-Amz-Signature``)."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name))
    return bool(_SECRET_NAME.search(re.sub(r"[^a-z0-9]+", "_", words.lower())))


def redacted(obj: Any) -> Any:
    """A copy of ``obj`` (JSON-like: dicts, lists, tuples, scalars) safe to write to a file, a tracker or a log:

    - the value of every secret-named key (``is_secret_name``) becomes ``REDACTED`` (None and "" stay, so "no key
      set" still reads as such);
    - in every string, URL userinfo becomes ``scheme://<redacted>@host`` and a secret-named query parameter
      ``name=<redacted>``;
    - every occurrence of the value of a secret-named environment variable (``RAY_AUTH_TOKEN``, ``WANDB_API_KEY``,
      ``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``, ...; 8 characters or more) becomes ``REDACTED``, wherever a config
      value embeds it.

    Everything else is kept as is. Pass secrets through the environment rather than the config: a redacted value
    cannot be read back from ``config.json`` or a checkpoint (give it again with an override).
    """
    return _redact(obj, None, _env_secrets())


def _env_secrets() -> list[str]:
    # Longest first, so a secret that contains another is blanked whole.
    return sorted(
        (v for k, v in os.environ.items() if len(v) >= _MIN_ENV_SECRET and is_secret_name(k)), key=len, reverse=True
    )


def _redact(x: Any, key: Any, env: list[str]) -> Any:
    if key is not None and is_secret_name(key) and x is not None and x != "":
        return REDACTED
    if isinstance(x, dict):
        return {k: _redact(v, k, env) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_redact(v, None, env) for v in x)
    if isinstance(x, str):
        for secret in env:
            x = x.replace(secret, REDACTED)
        if "://" in x:
            x = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", x)
            x = _URL_PARAM.sub(
                lambda m: f"{m['lead']}{m['name']}={REDACTED if is_secret_name(m['name']) else m['value']}", x
            )
    return x


def shown(key: str, value: Any) -> str:
    """``value`` of config key ``key`` (dotted) as an error message may show it: redacted like a written config."""
    return repr(_redact(value, key.rsplit(".", 1)[-1], _env_secrets()))
