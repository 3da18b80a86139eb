"""Keep credentials out of everything `vlpt launch` writes or prints.

Rendered jobs and the frozen run config are plain files on shared filesystems,
in `kubectl get -o yaml` and in MLflow params; credentials reach a job only from
its environment (Slurm, DeepSpeed: the submitting shell; Kubernetes: a Secret
reference). This check refuses a credential passed as an environment value in the
cluster YAML; a URL with a password is refused when any config is loaded
(`trainer.config_loader.check_no_url_passwords`).
"""
from __future__ import annotations

import re
from typing import Mapping

# Environment names that hold credentials (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
# MLFLOW_TRACKING_PASSWORD, HF_TOKEN, ...).
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)


def check_env_names(env: Mapping[str, str], where: str) -> None:
    for name in env:
        if CREDENTIAL_NAME.search(name):
            raise ValueError(f"{where}.{name}: credentials are never written into a job; Slurm and DeepSpeed "
                             f"jobs take {name} from the submitting environment, Kubernetes jobs from the "
                             f"Secret named in k8s.secret_name")
