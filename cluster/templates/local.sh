#!/bin/bash
# {{name}}: `vlpt {{vlpt_command}}` on {{nodes}} node(s) x {{nproc}} process(es), rendered by `vlpt launch {{target}}`
# from cluster/templates/local.sh; the frozen run config is {{config_path}}.
# Credentials (S3, MLflow) come from the environment this runs in, never from this file.
set -euo pipefail
cd {{workdir}}
{{accelerator}}
{{env}}
export PYTHONUNBUFFERED=1
{{pdsh_filter}}
exec {{command}}
