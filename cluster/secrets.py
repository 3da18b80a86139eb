"""Keep credentials out of everything `vlpt launch` writes or prints.

Rendered jobs and the frozen run config are plain files on shared filesystems,
in `kubectl get -o yaml`, in `ps` and in MLflow params; credentials reach a job
only from its environment:

- Slurm: the shell that runs `sbatch` (the job inherits it, --export=ALL), or
  files on the nodes (~/.aws/credentials).
- Kubernetes: the Secret named in k8s.secret_name, by secretKeyRef.
- DeepSpeed over several hosts: each host's own environment (~/.aws/credentials,
  a file its ~/.bashrc sources). Not .deepspeed_env: DeepSpeed's launcher puts
  every line of ~/.deepspeed_env and ./.deepspeed_env, and every variable named
  MLFLOW*, PYTHON*, NCCL*, UCX*, MV2*, on pdsh's command line (`export K=V; ...`),
  which every host's `ps` shows and the launcher logs. The rendered launch.sh
  therefore unsets such variables when they hold credentials (`pdsh_filter`).
- local: the shell that runs launch.sh.

This module refuses a credential given as a cluster `env:` value (by its name or
by the look of its value); a URL with a user name or password anywhere in a config
is refused when the config is loaded (`trainer.config_loader.check_config_values`).
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional

from trainer.config_loader import URL_USERINFO

# Names of variables that hold credentials (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, WANDB_API_KEY,
# AZURE_STORAGE_KEY, AZURE_CLIENT_SECRET, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, ...). Plain POSIX ERE
# (no backslashes), so that launch.sh tests names with the same pattern, upper-cased.
CREDENTIAL_NAME_ERE = ("SECRET|PASSWORD|PASSWD|PASSPHRASE|TOKEN|ACCESS_KEY|API_?KEY|ACCOUNT_KEY|"
                       "CONNECTION_STRING|CREDENTIAL|PRIVATE|AUTHORIZATION|COOKIE|_KEY$|^KEY$|(^|_)SAS(_|$)")
CREDENTIAL_NAME = re.compile(CREDENTIAL_NAME_ERE, re.IGNORECASE)
# Names whose value says where a credential is (GOOGLE_APPLICATION_CREDENTIALS=/path/key.json,
# AWS_SHARED_CREDENTIALS_FILE, AWS_WEB_IDENTITY_TOKEN_FILE): a path is not the secret; the file is.
CREDENTIAL_PATH_NAME = re.compile(r"(_FILE|_PATH|_DIR)$|^GOOGLE_APPLICATION_CREDENTIALS$", re.IGNORECASE)
# Values that are credentials whatever the name: connection strings with a key or password (Azure,
# ODBC, JDBC), SAS signatures in URLs, and the fixed shapes of common keys and tokens.
CONNECTION_SECRET = re.compile(r"(AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)\s*=|[?&]sig=",
                               re.IGNORECASE)
TOKEN_SHAPE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_\w{20,}|"
                         r"\bhf_[A-Za-z0-9]{20,}|\bxox[abpr]-[A-Za-z0-9-]{10,}|\bsk-[A-Za-z0-9_-]{20,}|"
                         r"-----BEGIN [A-Z ]*PRIVATE KEY-----")

HOST_ENVIRONMENT = ("set it in each host's own environment (~/.aws/credentials, a file the hosts' "
                    "~/.bashrc sources)")
WHERE_CREDENTIALS_GO = {
    "slurm": "export it in the shell that runs sbatch (the job inherits that environment) or keep it in "
             "a file on the nodes (e.g. ~/.aws/credentials)",
    "k8s": "put it in the Secret named by k8s.secret_name and list its key in k8s.secret_keys (the pod "
           "gets it by secretKeyRef)",
    "deepspeed": f"{HOST_ENVIRONMENT}, not in .deepspeed_env, whose lines DeepSpeed puts on pdsh's command line",
    "local": "export it in the shell that runs launch.sh",
}
ANY_TARGET = ("Slurm and local jobs take it from the submitting environment, DeepSpeed jobs from each "
              "host's own environment, Kubernetes jobs from the Secret named in k8s.secret_name")

# Variable name prefixes DeepSpeed's multi-node runner copies onto pdsh's command line: its
# EXPORT_ENVS plus the CUDA accelerator's export_envs() (tests check this against the installed one).
DEEPSPEED_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


def credential_reason(name: str, value: str) -> Optional[str]:
    """Why `name=value` is a credential (never quoting the value), or None."""
    path_to_key = (CREDENTIAL_PATH_NAME.search(name) is not None and "\n" not in value
                   and not value.lstrip().startswith(("{", "-----")))  # the value checks below still apply
    if CREDENTIAL_NAME.search(name) and not path_to_key:
        return "is a credential variable"
    if URL_USERINFO.search(value):
        return "holds a URL with a user name or password"
    if CONNECTION_SECRET.search(value):
        return "holds a connection string or URL with a key, signature or password"
    if TOKEN_SHAPE.search(value):
        return "holds what looks like an access key, token or private key"
    return None


def check_env(env: Mapping[str, str], where: str, target: Optional[str] = None) -> None:
    """Refuse a credential among the job's environment values; the error says where `target`'s go."""
    for name, value in env.items():
        reason = credential_reason(str(name), str(value))
        if reason:
            how = WHERE_CREDENTIALS_GO.get(target, ANY_TARGET)
            raise ValueError(f"{where}.{name} {reason}: credentials are never written into a job; {how}")


def check_deepspeed_env_files(workdir: str) -> None:
    """DeepSpeed's launcher sends each `NAME=value` line of ~/.deepspeed_env and <workdir>/.deepspeed_env
    (DS_ENV_FILE renames them) to the hosts on pdsh's command line: refuse one holding a credential."""
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    for folder in (os.path.expanduser("~"), workdir):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                reason = credential_reason(key, value)
                if reason:
                    raise ValueError(f"{path}: {key} {reason}; DeepSpeed puts every line of this file on pdsh's "
                                     f"command line; {HOST_ENVIRONMENT}")


def pdsh_filter() -> str:
    """Bash lines for launch.sh before a multi-node `deepspeed`: unset the variables DeepSpeed would
    forward over pdsh when they hold credentials (by name or a user@ URL), naming each on stderr."""
    prefixes = "|".join(f"{p}*" for p in DEEPSPEED_EXPORT_PREFIXES)
    return "\n".join([
        "# DeepSpeed copies every variable named " + ", ".join(f"{p}*" for p in DEEPSPEED_EXPORT_PREFIXES),
        "# onto pdsh's command line (seen in `ps` on every host): credentials among them stay here;",
        "# the hosts take theirs from their own environment.",
        f"credential_name='{CREDENTIAL_NAME_ERE}'",
        "userinfo_url='[A-Za-z][A-Za-z0-9+.-]*://[^/?#@[:space:]]*@'",
        "for name in $(compgen -e); do",
        f"    case \"$name\" in {prefixes}) ;; *) continue ;; esac",
        "    if [[ \"${name^^}\" =~ $credential_name || \"${!name}\" =~ $userinfo_url ]]; then",
        "        echo \"launch.sh: $name is not passed to the hosts (DeepSpeed would put it on pdsh's command "
        "line); give each host its own\" >&2",
        "        unset \"$name\"",
        "    fi",
        "done",
    ])
