# shellcheck shell=bash
# Shared by the install_*.sh scripts: how apt-get can run on this machine. Sourced, not run.
#
# apt_runner SCRIPT WHAT PACKAGES: sets the array `sudo` to the prefix apt-get needs (empty as root, `sudo -n` with
# password-less sudo), or prints one line saying what to do and exits 1.
apt_runner() {
    local script=$1 what=$2 packages=$3
    if ! command -v apt-get > /dev/null; then
        echo "$script: cannot install $what: no apt-get on this machine; install $packages by hand" >&2
        exit 1
    fi
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo > /dev/null && sudo -n true 2> /dev/null; then
            sudo=(sudo -n)
        else
            echo "$script: cannot install $what: not root and no password-less sudo; run" \
                "'sudo apt-get install $packages' once" >&2
            exit 1
        fi
    fi
}
