#!/usr/bin/env bash
# Install the Debian packages for the real single-node Slurm the launcher tests start
# (tests/support/slurm_cluster.py). Needs root and apt; exits 0 with a message when it cannot install,
# so that CI goes on and the Slurm tests skip saying why.
set -u
packages=(slurmctld slurmd slurm-client)

have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }
if have slurmctld && have slurmd && have sbatch && have srun; then
    echo "install_slurm: Slurm already installed ($(PATH=$PATH:/usr/sbin slurmctld -V))"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install_slurm: not root, cannot install ${packages[*]}; Slurm tests will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: no apt-get on this system; install ${packages[*]} by hand; Slurm tests will skip"
    exit 0
fi
if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null; then
    echo "install_slurm: installed $(PATH=$PATH:/usr/sbin slurmctld -V)"
else
    echo "install_slurm: apt-get could not install ${packages[*]}; Slurm tests will skip"
fi
exit 0
