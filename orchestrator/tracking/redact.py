"""Keep credentials out of MLflow params, tags, artifacts and logs."""
from __future__ import annotations

import os
import re
from typing import Any

SECRET_KEY_PATTERN = re.compile(r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key|session[_-]?key|private)",
                                re.IGNORECASE)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
REDACTED = "***"


def secret_values() -> list[str]:
    """Values of secret-looking environment variables (at least 4 characters long)."""
    vals = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    vals |= {v for k, v in os.environ.items() if SECRET_KEY_PATTERN.search(k) and v}
    return sorted((v for v in vals if len(v) >= 4), key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for s in secrets if secrets is not None else secret_values():
        text = text.replace(s, REDACTED)
    # user:password@ in URIs
    return re.sub(r"(://[^/:@\s]+):[^/@\s]+@", r"\1:" + REDACTED + "@", text)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a nested dict/list with secret-named keys and secret values masked."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and SECRET_KEY_PATTERN.search(k) and v not in (None, "")
                    else redact(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj
