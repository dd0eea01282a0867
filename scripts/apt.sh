# Sourced by the scripts/ensure-*.sh scripts (not run on its own).
#
# apt_install WHO PACKAGE...: install Debian packages with apt-get, quietly and without
# recommends, via sudo when not root; WHO (the calling script) prefixes the messages. It leaves
# `as_root` set to the prefix that runs a command as root, for what the caller does next.

apt_install() {
    local who=$1
    shift
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$who: apt-get is not available; install $* manually" >&2
        return 1
    fi
    as_root=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            as_root=(sudo -n)
        else
            echo "$who: not root and sudo is unavailable; cannot install $*" >&2
            return 1
        fi
    fi
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >&2
}
