#!/usr/bin/env bash
# Install Debian's Slurm daemons and client (slurmctld, slurmd, slurm-client) for the local test cluster.
#
#   launch/install_slurm.sh        (make test calls it; tests/slurm_cluster.py starts the daemons itself)
#
# Idempotent: returns at once when the commands are already there. It never starts or enables the system services;
# the tests run their own slurmctld/slurmd on loopback with their own slurm.conf. Exits non-zero with one line that
# says why when it cannot install (not Debian/Ubuntu, not root and no sudo, apt failing).
set -euo pipefail

needed=(slurmctld slurmd sbatch srun scontrol)
missing() {
    local cmd
    for cmd in "${needed[@]}"; do
        command -v "$cmd" > /dev/null || PATH="$PATH:/usr/sbin" command -v "$cmd" > /dev/null || return 0
    done
    return 1
}

if ! missing; then
    echo "install_slurm.sh: slurm already installed ($(PATH="$PATH:/usr/sbin" slurmctld -V 2>/dev/null || echo '?'))"
    exit 0
fi
# shellcheck source=launch/apt_runner.sh
source "$(dirname "$0")/apt_runner.sh"
apt_runner install_slurm.sh Slurm "slurmctld slurmd slurm-client (Slurm 22.05 or newer, with auth/none)"

# The packages' maintainer scripts would start the system services; in a container or CI runner without an init
# system invoke-rc.d only warns, and on a machine with systemd the services stay disabled (policy-rc.d exit 101 is
# "action forbidden"). The policy file is ours only if we created it, so only then is it removed.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" > /dev/null
    "${sudo[@]}" chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [[ $created_policy == 1 ]]; then "${sudo[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt_log=$(mktemp)
install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client > "$apt_log" 2>&1
}
if ! install; then
    # A fresh container has no package lists yet; refresh them once and retry.
    "${sudo[@]}" apt-get update -q > "$apt_log" 2>&1 || true
    if ! install; then
        tail -n 5 "$apt_log" >&2
        rm -f "$apt_log"
        echo "install_slurm.sh: cannot install Slurm: apt-get install slurmctld slurmd slurm-client failed" \
            "(its last lines are above)" >&2
        exit 1
    fi
fi
rm -f "$apt_log"
if missing; then
    echo "install_slurm.sh: apt-get succeeded but slurmctld/slurmd/sbatch are still not on PATH or in /usr/sbin" >&2
    exit 1
fi
echo "install_slurm.sh: installed $(PATH="$PATH:/usr/sbin" slurmctld -V)"
