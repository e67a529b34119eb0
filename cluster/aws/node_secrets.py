"""Secrets for a cluster node, from AWS Secrets Manager, without putting them on a command line.

Run by cluster/aws.yaml's start commands on each node (through its instance profile):

    node_secrets.py ray-token PATH             Ray's auth token (mplug2/ray-auth-token) -> PATH, mode 0600
    node_secrets.py mlflow-auth-config PATH    the MLflow basic-auth app's config (mplug2/mlflow-auth) -> PATH
    node_secrets.py mlflow-aws-profile PATH    an AWS profile `mplug2-mlflow` that assumes the MLflow role
    node_secrets.py mlflow-server-env PATH     MLFLOW_BACKEND_STORE_URI (mplug2/mlflow-db) and the auth
                                               app's first admin password (mplug2/mlflow-auth), as an env file
    node_secrets.py mlflow-client-env PATH     MLFLOW_TRACKING_USERNAME / _PASSWORD (mplug2/mlflow-client)
    node_secrets.py print SECRET_ID [FIELD]    the secret (or one field of a JSON secret) on stdout

Values go to files only this user can read, or to stdout captured into the environment; never to
argv, never to a log. Standard library + boto3 only (this runs before anything else is set up).
"""
from __future__ import annotations

import configparser
import json
import os
import sys


def secret(secret_id: str, field: str | None = None) -> str:
    import boto3

    value = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"]
    if field is None:
        return value
    return str(json.loads(value)[field])


def write_private(path: str, text: str) -> None:
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def mlflow_auth_config() -> str:
    cfg = configparser.ConfigParser()
    cfg["mlflow"] = {
        "default_permission": "READ",  # every logged-in user reads; writers are granted per experiment
        "database_uri": secret("mplug2/mlflow-auth", "database_uri"),
        "admin_username": "admin",
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    lines = []
    for section in cfg.sections():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in cfg[section].items()]
    return "\n".join(lines) + "\n"


def mlflow_aws_profile(path: str) -> str:
    import boto3

    account = boto3.client("sts").get_caller_identity()["Account"]
    role = os.environ.get("MPLUG2_MLFLOW_ROLE_ARN", f"arn:aws:iam::{account}:role/mplug2-mlflow")
    cfg = configparser.ConfigParser()
    cfg.read(os.path.expanduser(path))
    cfg["profile mplug2-mlflow"] = {"role_arn": role, "credential_source": "Ec2InstanceMetadata"}
    out = []
    for section in cfg.sections():
        out.append(f"[{section}]")
        out += [f"{k} = {v}" for k, v in cfg[section].items()]
    return "\n".join(out) + "\n"


def env_file(values: dict[str, str]) -> str:
    """``KEY='value'`` lines for ``set -a; . FILE; set +a`` (single quotes, escaped)."""
    return "".join(f"{k}='" + v.replace("'", "'\\''") + "'\n" for k, v in values.items())


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "ray-token":
        write_private(argv[1], secret("mplug2/ray-auth-token"))
    elif len(argv) >= 2 and argv[0] == "mlflow-auth-config":
        write_private(argv[1], mlflow_auth_config())
    elif len(argv) >= 2 and argv[0] == "mlflow-aws-profile":
        write_private(argv[1], mlflow_aws_profile(argv[1]))
    elif len(argv) >= 2 and argv[0] == "mlflow-server-env":
        write_private(argv[1], env_file({"MLFLOW_BACKEND_STORE_URI": secret("mplug2/mlflow-db"),
                                         "MLFLOW_AUTH_ADMIN_PASSWORD": secret("mplug2/mlflow-auth", "admin_password")}))
    elif len(argv) >= 2 and argv[0] == "mlflow-client-env":
        write_private(argv[1], env_file({"MLFLOW_TRACKING_USERNAME": secret("mplug2/mlflow-client", "username"),
                                         "MLFLOW_TRACKING_PASSWORD": secret("mplug2/mlflow-client", "password")}))
    elif len(argv) >= 2 and argv[0] == "print":
        sys.stdout.write(secret(argv[1], argv[2] if len(argv) > 2 else None))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
