#!/usr/bin/env bash
# Packaging checks for CI (Debian 12, as root):
#   1. `systemd-analyze security --offline=true` rates every service OK or
#      better (overall exposure <= 4.9), and the timer is shipped disabled
#      (no [Install] of its service, which the timer starts);
#   2. the Debian package builds (packaging/build-deb.sh) and holds what it
#      must;
#   3. `systemd-analyze verify` reports nothing about the units as shipped in
#      the package. /usr/bin/keyholder does not exist on the build machine, so
#      the units are verified from a copy of the package's files
#      (dpkg-deb -x) with ExecStart's /usr/bin/keyholder pointing at the
#      extracted binary. Man page references are checked against the
#      generated pages instead of `man` (which a minimal image may lack).
# Installs what a fresh Debian 12 lacks: systemd (systemd-analyze), procps
# (/bin/kill, used by ExecReload), dpkg-dev, cargo-deb.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[ -x /bin/kill ] || missing+=(procps)
command -v dpkg-shlibdeps >/dev/null 2>&1 || missing+=(dpkg-dev)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "ci-check: installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

units=(packaging/systemd/*.service)
failed=0

echo "== systemd-analyze security (must be OK or better: exposure <= 4.9)"
for unit in "${units[@]}"; do
    out="$(systemd-analyze security --offline=true --threshold=49 "$unit" 2>&1)" && rc=0 || rc=$?
    verdict="$(printf '%s\n' "$out" | grep 'Overall exposure level' || true)"
    echo "$unit: ${verdict:-no verdict}"
    if [ "$rc" -ne 0 ] || ! printf '%s\n' "$verdict" | grep -Eq ' (SAFE|OK) '; then
        printf '%s\n' "$out" | grep -E '✗|Overall' >&2 || true
        echo "FAIL: $unit is rated worse than OK" >&2
        failed=1
    fi
done
# keyholder-metrics.service is started by its timer only: it has no
# [Install] section, and the package must not enable either.
if grep -q '^\[Install\]' packaging/systemd/keyholder-metrics.service; then
    echo "FAIL: keyholder-metrics.service has an [Install] section (the timer starts it)" >&2
    failed=1
fi
if ! grep -q 'unit-name = "keyholder-metrics", enable = false, start = false' Cargo.toml; then
    echo "FAIL: Cargo.toml must ship keyholder-metrics disabled and not started" >&2
    failed=1
fi
[ "$failed" -eq 0 ] || exit 1

echo "== build the Debian package"
start=$(date +%s)
deb="$(packaging/build-deb.sh | tail -n 1)"
echo "built $deb in $(( $(date +%s) - start )) s"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
contents="$(dpkg-deb -c "$deb")"
for path in usr/bin/keyholder etc/keyholder/keyholder.toml \
    usr/lib/systemd/system/keyholder.service usr/lib/systemd/system/keyholder-arm.service \
    usr/lib/systemd/system/keyholder-metrics.service usr/lib/systemd/system/keyholder-metrics.timer \
    usr/share/doc/keyholder/docs/metrics.md \
    usr/share/man/man1/keyholder.1.gz usr/share/man/man1/keyholder-arm.1.gz \
    usr/share/bash-completion/completions/keyholder usr/share/zsh/vendor-completions/_keyholder \
    usr/share/fish/vendor_completions.d/keyholder.fish usr/share/doc/keyholder/README.Debian; do
    # A here-string, not a pipe: `grep -q` stops reading at the first match,
    # and under pipefail the writer's SIGPIPE would read as "missing".
    if ! grep -q " \./$path\$" <<<"$contents"; then
        echo "FAIL: $deb lacks /$path" >&2
        failed=1
    fi
done
if [ "$(dpkg-deb -f "$deb" Depends | grep -c openssh-client)" -ne 1 ]; then
    echo "FAIL: $deb does not depend on openssh-client" >&2
    failed=1
fi
if ! grep -qx /etc/keyholder/keyholder.toml <<<"$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)"; then
    echo "FAIL: /etc/keyholder/keyholder.toml is not a conffile" >&2
    failed=1
fi
"$root/usr/bin/keyholder" --version

echo "== systemd-analyze verify (the packaged units)"
verify_dir="$root/verify"
mkdir "$verify_dir"
# The metrics timer must not be enabled by the maintainer scripts.
if grep -q "enable 'keyholder-metrics" <<<"$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./postinst 2>/dev/null)"; then
    echo "FAIL: the package enables keyholder-metrics (it must ship disabled)" >&2
    failed=1
fi

for unit in "$root"/usr/lib/systemd/system/*.service "$root"/usr/lib/systemd/system/*.timer; do
    sed "s|/usr/bin/keyholder|$root/usr/bin/keyholder|g" "$unit" > "$verify_dir/$(basename "$unit")"
    # Each man:keyholder… page the unit points to must be in the package.
    for page in $(grep -o 'man:keyholder[a-z-]*([0-9])' "$unit" | sed 's/^man://'); do
        name="${page%(*}" section="${page#*(}"
        section="${section%)}"
        if [ ! -e "$root/usr/share/man/man$section/$name.$section.gz" ]; then
            echo "FAIL: $(basename "$unit") documents $page, which the package lacks" >&2
            failed=1
        fi
    done
done
out="$(systemd-analyze verify --man=no "$verify_dir"/*.service "$verify_dir"/*.timer 2>&1)" && rc=0 || rc=$?
if [ "$rc" -ne 0 ] || grep -q keyholder <<<"$out"; then
    printf '%s\n' "$out" >&2
    echo "FAIL: systemd-analyze verify complained (exit $rc)" >&2
    failed=1
else
    echo "verify: no complaints about ${units[*]} $(echo packaging/systemd/*.timer)"
fi

if [ "$failed" -ne 0 ]; then
    exit 1
fi
echo "packaging checks: all passed"
