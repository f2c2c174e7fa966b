# Shared by the install_*.sh scripts (sourced, not run): the Debian packages of a list that are missing, and
# whether this machine can install them.
#
#   source "$(dirname "$0")/apt_packages.sh"
#   missing_packages NAME PKG...   # sets the array `missing`; exits 0 when nothing is missing
#                                   # (saying so), 1 with the reason when they cannot be installed here

missing_packages() {
    local name=$1
    shift
    missing=()
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "$name: $* already installed"
        exit 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$name: apt-get not found: install ${missing[*]} with your system's package manager" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "$name: installing ${missing[*]} needs root (run: sudo $0)" >&2
        exit 1
    fi
    echo "$name: installing ${missing[*]}"
}
