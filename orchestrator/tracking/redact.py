"""Keep credentials out of MLflow params, tags, artifacts, exceptions and logs.

Three layers, each applied to everything that leaves a process:

1. **Secret-named keys**: a config or tag key whose words name a secret (``password``,
   ``db_password``, ``api_key``, ``hf_token``, ``aws_secret_access_key`` ...) has its value masked.
   Words, not substrings: ``data.tokenizer``, ``mask_token_id`` or ``TOKENIZERS_PARALLELISM`` are not
   secrets.
2. **Secret-shaped text** anywhere in a value or message: the password of a URI
   (``scheme://user:pass@host``, also when it contains ``/``, ``+`` or ``@``), presigned-URL
   signatures and credentials (``X-Amz-Signature=``, ``X-Amz-Credential=``,
   ``X-Amz-Security-Token=``, ``Signature=``, ``sig=``, ``token=`` ...), ``Bearer`` tokens, Hugging
   Face ``hf_`` tokens, GitHub tokens (``ghp_`` ... ``github_pat_``), AWS access key ids and bare AWS
   secret access keys (40 characters of base64 mixing cases and digits), PEM private key blocks,
   Azure storage account keys (``AccountKey=``, ``SharedAccessKey=``, a bare 88-character key), and
   ``key=value`` / ``key: value`` pairs whose key names a secret (libpq connection strings:
   ``host=db password=...``; ``db_pass``, ``pwd``).  Each shape has its own test
   (``tests/tracking/test_redaction.py``, ``tests/tracking/test_secret_shapes.py``).
3. **Known secret values**: the values of this process's secret-named environment variables.

:func:`install_log_redaction` applies 2 and 3 to every log record of the process (Ray's and
MLflow's loggers included, and the text of logged exceptions); :func:`redact_exception` to an
exception's message before it leaves a worker or the CLI.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

REDACTED = "***"
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "RAY_AUTH_TOKEN",
              "MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD")

# Words (of a key split at '.', '_', '-', spaces and camelCase) that make the key's value a secret.
SECRET_WORDS = {"secret", "secrets", "password", "passwd", "passphrase", "credential", "credentials",
                "apikey", "privatekey", "signature", "sig", "pass", "pwd", "accountkey", "sas"}
# The shell's working-directory variables are paths, not passwords.
NOT_SECRET_NAMES = {"PWD", "OLDPWD"}
# ... and pairs of words (``api_key``, ``access-key``, ``session_key``, ``client_secret`` is caught above).
SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("session", "key"), ("private", "key"),
                ("signing", "key"), ("encryption", "key"), ("auth", "key"), ("account", "key"),
                ("connection", "string"), ("shared", "access")}
# 'token' only as the key's last word (``hf_token``, ``auth_token``), never ``token_type_ids``.
LAST_WORDS = {"token", "auth", "authorization", "cookie"}

_WORD_SPLIT = re.compile(r"[._\-\s/:]+|(?<=[a-z0-9])(?=[A-Z])")
# in text, a key counts when it ends with one of these (``hf_token=``, ``password:``, not ``tokenizer=``)
_SECRET_KEY_TEXT = (r"[\w.\-]*?(?:password|passwd|pwd|(?<=[_.\-])pass|secret|token|api[_-]?key|access[_-]?key|"
                    r"session[_-]?key|private[_-]?key|account[_-]?key|signature|credentials?)")


def _looks_random(token: str) -> bool:
    """A bare token that mixes upper and lower case and digits, with enough distinct characters to
    be a generated key (a 40-character git commit is lower-case hex: not one)."""
    return (any(c.islower() for c in token) and any(c.isupper() for c in token) and any(c.isdigit() for c in token)
            and len(set(token)) >= 16)


def _mask_random(m: re.Match) -> str:
    return REDACTED if _looks_random(m.group(0)) else m.group(0)
TEXT_PATTERNS = [
    # PEM private keys (RSA, EC, OPENSSH, ENCRYPTED ...): the whole block, or all of it that is there
    (re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL),
     "-----BEGIN \\1PRIVATE KEY-----" + REDACTED + "-----END \\1PRIVATE KEY-----"),
    # scheme://user:password@host  (the password may hold '/', '+', '=', '@' ...: up to the last '@'
    # before the host)
    (re.compile(r"(\b[A-Za-z][\w+.\-]*://[^\s:/@'\"]*):([^\s'\"]+)@(?=[^\s@'\"/]+)"), r"\1:" + REDACTED + "@"),
    # Azure storage / Service Bus connection strings
    (re.compile(r"\b((?:AccountKey|SharedAccessKey|SharedAccessSignature)=)[^;'\"\s]+", re.IGNORECASE),
     r"\1" + REDACTED),
    # query-string / form credentials of presigned URLs and API calls
    (re.compile(r"([?&;](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId|sig|"
                r"token|access_token|id_token|refresh_token|api_key|apikey|key|password|secret|"
                r"x-goog-signature|x-goog-credential)=)[^&\s#'\"]+", re.IGNORECASE), r"\1" + REDACTED),
    # Authorization headers
    (re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE), r"\1 " + REDACTED),
    # Hugging Face tokens, GitHub tokens (classic and fine-grained), AWS access key ids
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}\b"), REDACTED),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA|ABIA|ACCA)[A-Z0-9]{16}\b"), REDACTED),
    # bare AWS secret access keys (40) and Azure account keys (86 + '=='): base64 standing alone
    (re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"), _mask_random),
    (re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{86}==(?![A-Za-z0-9/+=])"), _mask_random),
    # key=value / key: value where the key names a secret (libpq strings, env dumps, JSON-ish text)
    (re.compile(r"(\b" + _SECRET_KEY_TEXT + r"['\"]?[ \t]*[=:][ \t]*['\"]?)(?!//)([^\s'\",;&}]+)", re.IGNORECASE),
     r"\1" + REDACTED),
]


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD_SPLIT.split(key) if w]


def is_secret_key(key: str) -> bool:
    """Whether a config/tag/env key names a secret (by its words, not its substrings)."""
    if key in NOT_SECRET_NAMES:
        return False
    words = _words(key)
    if not words:
        return False
    if any(w in SECRET_WORDS for w in words):
        return True
    if any(pair in SECRET_PAIRS for pair in zip(words, words[1:])):
        return True
    return words[-1] in LAST_WORDS


def secret_values() -> list[str]:
    """Values of secret-named environment variables (at least 6 characters: no 'true', no '1')."""
    vals = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    vals |= {v for k, v in os.environ.items() if v and is_secret_key(k)}
    return sorted((v for v in vals if len(v) >= 6), key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with known secret values and secret-shaped substrings masked."""
    if not isinstance(text, str) or not text:
        return text
    for s in secrets if secrets is not None else secret_values():
        text = text.replace(s, REDACTED)
    for pattern, repl in TEXT_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a nested dict/list with secret-named keys' values and secret-shaped text masked."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and is_secret_key(k) and obj[k] not in (None, "")
                    else redact(obj[k], secrets)) for k in obj}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


def redact_exception(e: BaseException) -> BaseException:
    """Mask secrets in an exception's message in place (same type, same traceback) and return it."""
    try:
        secrets = secret_values()
        e.args = tuple(redact_text(a, secrets) if isinstance(a, str) else a for a in e.args)
        for attr in ("message", "msg", "detail"):
            if isinstance(getattr(e, attr, None), str):
                setattr(e, attr, redact_text(getattr(e, attr), secrets))
    except Exception:  # an exception type with read-only args stays as it is
        pass
    return e


# ---------------------------------------------------------------------------------------------
# Logging: every record of the process, whoever logs it
# ---------------------------------------------------------------------------------------------

_INSTALLED = {"factory": None}


def install_log_redaction() -> None:
    """Wrap the log-record factory so every record's message (and exception text) is redacted when
    it is created, before any handler sees it. Idempotent; safe in drivers and Ray workers."""
    if _INSTALLED["factory"] is not None:
        return
    base = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = base(*args, **kwargs)
        try:
            msg = record.getMessage()
            clean = redact_text(msg)
            if clean != msg:
                record.msg, record.args = clean, ()
            if record.exc_info and record.exc_info[1] is not None:
                redact_exception(record.exc_info[1])
        except Exception:  # a record that cannot be formatted is left to its handler
            pass
        return record

    logging.setLogRecordFactory(factory)
    _INSTALLED["factory"] = factory
