#!/bin/sh
# Mutation testing (mutmut) of the modules that decide security and routing, each against its
# own unit tests: would the tests notice if the code were subtly wrong?
#
#   sh scripts/mutation.sh                 # every module below, one after the other
#   sh scripts/mutation.sh sas routes      # selected modules
#
# Each module runs in a scratch copy, build/mutation/<module>/ (gateway/, tests/, and
# pyproject.toml with a [tool.mutmut] section naming the module and its tests), so the
# working tree is never mutated and modules do not share results. The last line per module is
# its kill rate; list the survivors with
#   cd build/mutation/<module> && ../../../.venv/bin/mutmut results
# and look at one with `mutmut show NAME` there. Survivors that are equivalent mutants (no test
# could tell them apart) are listed, with the reason, in tests/MUTATION.md; every other
# survivor is a missing assertion.
#
# mutmut is CPU-heavy: it runs niced, on MUTATION_JOBS processes (default 1).
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"

if [ ! -x "$PY" ]; then
    echo "scripts/mutation.sh: no .venv: run sh scripts/test.sh once first" >&2
    exit 2
fi
# mutmut is a test-only tool, pinned with hashes in its own lock (not in test.lock: CI does not
# run it).
"$PY" -m pip install -q --require-hashes -r requirements/mutation.lock

# module -> the file to mutate and its own unit tests
tests_for() {
    case $1 in
    sas) echo "gateway/auth/sas.py tests/test_sas.py tests/auth/test_tokens.py tests/auth/test_store.py" ;;
    credentials) echo "gateway/auth/credentials.py tests/auth/test_store.py tests/mqtt/test_credentials_units.py tests/router/test_credentials.py" ;;
    local_auth) echo "gateway/auth/local_auth.py tests/auth/test_local_auth.py tests/auth/test_store.py tests/auth/test_credentials_config.py" ;;
    tokens) echo "gateway/auth/tokens.py tests/auth/test_tokens.py tests/auth/test_dps.py" ;;
    dps) echo "gateway/auth/dps.py tests/auth/test_dps.py tests/auth/test_store.py" ;;
    identity) echo "gateway/router/identity.py tests/router/test_identity.py" ;;
    routes) echo "gateway/router/routes.py tests/router/test_routes.py" ;;
    cbs) echo "gateway/router/cbs.py tests/router/test_cbs_units.py tests/router/test_cbs_messages.py tests/router/test_cbs_order.py tests/router/test_core.py tests/router/test_credentials.py" ;;
    packets) echo "gateway/mqtt/packets.py tests/mqtt/test_codec_errors.py tests/mqtt/test_codec_rules.py tests/mqtt/test_codec_properties.py tests/mqtt/test_codec_batch.py tests/mqtt/test_codec_paho.py tests/mqtt/test_codec_amqtt.py" ;;
    *) return 1 ;;
    esac
}

ALL="sas credentials local_auth tokens dps identity routes cbs packets"
[ $# -gt 0 ] || set -- $ALL

for module in "$@"; do
    spec=$(tests_for "$module") || { echo "unknown module $module (one of: $ALL)" >&2; exit 2; }
    target=${spec%% *}
    tests=""
    for t in ${spec#* }; do
        tests="$tests\"$t\", "
    done
    work="build/mutation/$module"
    rm -rf "$work"
    mkdir -p "$work"
    cp -r gateway "$work/"
    # tests/ without the Node.js SDK's node_modules
    tar -cf - --exclude=node_modules --exclude=__pycache__ tests | tar -xf - -C "$work"
    cp pyproject.toml "$work/"
    cat >>"$work/pyproject.toml" <<EOF

[tool.mutmut]
only_mutate = ["$target"]
source_paths = ["gateway"]
tests_dir = [$tests]
pytest_add_cli_args = ["-p", "no:randomly", "-p", "no:cacheprovider", "-q"]
max_children = ${MUTATION_JOBS:-1}
EOF
    (cd "$work" && nice -n 10 "$ROOT/.venv/bin/mutmut" run >mutmut.log 2>&1) || {
        echo "$module: mutmut failed, see $work/mutmut.log" >&2
        tail -20 "$work/mutmut.log" >&2
        exit 1
    }
    (cd "$work" && "$ROOT/.venv/bin/mutmut" results --all true >results.txt 2>&1) || true
    "$PY" - "$work" "$module" <<'EOF'
import re, sys
from collections import Counter
work, module = sys.argv[1], sys.argv[2]
text = open(f"{work}/results.txt").read()
states = Counter(m.group(1) for m in re.finditer(r":\s*(\w[\w ]*)$", text, re.M))
total = sum(states.values())
killed = states.get("killed", 0) + states.get("timeout", 0)
print(f"{module}: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%), "
      + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
EOF
done
