#!/bin/sh
# Best effort, used by `make test`: install Debian's slurm-wlm and munge for the Slurm integration
# test (tests/integration/test_slurm_job.py). It never fails the build: without root, apt-get or
# network it says why and the test skips with its own reason.
if command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ]; then
    exit 0  # already there
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_test_services: not root; the Slurm test will skip"; exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_services: no apt-get; the Slurm test will skip"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt_install() { timeout 600 apt-get install -y -q --no-install-recommends slurm-wlm munge >/tmp/install_test_services.log 2>&1; }
if apt_install || { timeout 300 apt-get update -q >>/tmp/install_test_services.log 2>&1 && apt_install; }; then
    echo "install_test_services: installed slurm-wlm and munge"
else
    echo "install_test_services: could not install slurm-wlm munge (see /tmp/install_test_services.log); the Slurm test will skip"
fi
exit 0
