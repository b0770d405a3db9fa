# Sourced by scripts/test.sh and scripts/demo.sh before they install requirements/sim.lock or
# test.lock. python-qpid-proton (the emulated hub and the test devices) has no Linux wheels on
# PyPI, so pip compiles it; without OpenSSL's headers it still builds, but with TLS stubbed
# out, and every TLS test and the demo fail later for no visible reason. So the build tools
# are checked up front and, on Debian/Ubuntu, installed when missing.
sim_prereqs() {
    if "$1" -c 'import proton, sys; sys.exit(not proton.SSL.present())' 2>/dev/null; then
        return 0  # already built, with TLS
    fi
    missing=""
    command -v cc >/dev/null 2>&1 || missing="$missing gcc libc6-dev"
    "$1" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing="$missing python3-dev"
    if ! command -v pkg-config >/dev/null 2>&1; then
        missing="$missing pkg-config libssl-dev"
    elif ! pkg-config --exists openssl; then
        missing="$missing libssl-dev"
    fi
    if [ -n "$missing" ]; then
        echo "python-qpid-proton is built from source here and needs:$missing" >&2
        apt_install $missing
    fi
}

# Debian/Ubuntu packages the setup needs, installed with apt-get (as root, or through sudo,
# which may ask for a password); elsewhere, or when that fails, say what to install and stop.
apt_install() {
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        [ "$(id -u)" = 0 ] || ! command -v sudo >/dev/null 2>&1 || sudo=sudo
        if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
            echo "installing with apt-get: $*" >&2
            # A fresh machine may have empty package lists: update once if the first try fails.
            if $sudo apt-get install -y -q "$@" >/dev/null ||
                { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "$@" >/dev/null; }; then
                return 0
            fi
        fi
    fi
    echo "  install them (Debian/Ubuntu: sudo apt-get install -y $*), then run this again" >&2
    exit 1
}

# The virtual environment; Debian and Ubuntu ship venv's pip bootstrap separately.
make_venv() {
    [ -x .venv/bin/python ] && return 0
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        apt_install python3-venv
        python3 -m venv .venv
    fi
}

# After the install: a proton without TLS (built earlier without libssl-dev, and cached by pip).
sim_check_tls() {
    if ! "$1" -c 'import proton, sys; sys.exit(not proton.SSL.present())'; then
        echo "python-qpid-proton was built without TLS; with libssl-dev installed run:" >&2
        echo "  $1 -m pip cache remove python_qpid_proton; rm -rf .venv; then this again" >&2
        exit 1
    fi
}
