#!/usr/bin/env bash
# The team's MLflow tracking server on its own EC2 instance, outside the Ray cluster.
#
# Why not on the Ray head: every job driver runs on the head as the same user, so a job could read
# the server's database URI and admin password from its files and assume its role through the
# head's profile. Here no Ray node holds either: the head and the GPU nodes hold only the jobs'
# login (mplug2/mlflow-client), the decode nodes nothing of MLflow.
#
# Launch once (user data, as root), on an instance in the cluster's private subnets with
#   - instance profile mplug2-mlflow-host (iam/mlflow-host-policy.json: its two secrets, and
#     sts:AssumeRole on mplug2-mlflow, the artifact bucket's role: iam/mlflow-policy.json),
#   - security group mplug2-mlflow (aws/mlflow-security-group.json: 5000 from the Ray nodes and the
#     team's CIDR, SSH from the team's CIDR),
#   - Docker, the project image (cluster/Dockerfile, the same mlflow as the clients) and this folder
#     (cluster/aws) at /opt/mplug2-cluster,
# and a private DNS record mlflow.mplug2.internal for it (the MLFLOW_TRACKING_URI of aws.yaml).
#
# Secrets never reach a command line (`ps` shows those to every user): node_secrets.py writes them
# to 0600 files, which the server's shell loads into its environment (MLflow reads
# MLFLOW_BACKEND_STORE_URI from there). The server listens on the instance's private address only.
set -euo pipefail

IMAGE=${MPLUG2_IMAGE:-mplug2-ray:0.1.0-gpu}
SECRETS=/etc/mplug2-mlflow
install -d -m 0700 -o 1000 -g 100 "$SECRETS"   # the image's user (ray, uid 1000) reads them, nobody else

docker run --rm --network host -v /opt/mplug2-cluster:/cluster:ro -v "$SECRETS":/out "$IMAGE" bash -c '
  umask 077
  python /cluster/node_secrets.py mlflow-server-env /out/server.env
  python /cluster/node_secrets.py mlflow-auth-config /out/basic_auth.ini
  python /cluster/node_secrets.py mlflow-aws-profile /out/aws_config'

PRIVATE_IP=$(hostname -I | cut -d' ' -f1)
docker rm -f mlflow 2>/dev/null || true
docker run -d --restart unless-stopped --name mlflow --network host -v "$SECRETS":/secrets:ro \
  -e MLFLOW_AUTH_CONFIG_PATH=/secrets/basic_auth.ini -e AWS_CONFIG_FILE=/secrets/aws_config -e AWS_PROFILE=mplug2-mlflow \
  "$IMAGE" bash -c 'set -a; . /secrets/server.env; set +a;
  exec mlflow server --app-name basic-auth --host "$0" --port 5000 --workers 4 \
  --artifacts-destination s3://mplug2-mlflow-artifacts/mlflow \
  --allowed-hosts "mlflow.mplug2.internal:5000,$0:5000,localhost:5000"' "$PRIVATE_IP"
