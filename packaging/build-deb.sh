#!/usr/bin/env bash
# Builds the Debian package target/debian/keyholder_VERSION-1_ARCH.deb:
#   1. man pages and shell completions from the clap definition
#      (examples/gen-manpages.rs) into target/assets/;
#   2. `cargo deb`, which builds the release binary and packs it with the
#      assets listed in Cargo.toml [package.metadata.deb].
# Installs cargo-deb (crates.io) and dpkg-dev (for dpkg-shlibdeps) if missing.
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v dpkg-shlibdeps >/dev/null 2>&1; then
    echo "build-deb: installing dpkg-dev (dpkg-shlibdeps)" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dpkg-dev
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb: installing cargo-deb" >&2
    cargo install cargo-deb --locked
fi

# Reproducible man page dates: the last commit's time unless already set.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH

# The generator writes where Cargo.toml's assets expect it (relative to the
# crate root, whatever CARGO_TARGET_DIR is). Dev profile: `cargo test` has
# usually built it already (examples are part of the test build), and its
# dev-dependencies' features would not let it share a release build with the
# package's binary anyway.
rm -rf target/assets
cargo run --quiet --locked --example gen-manpages -- target/assets >/dev/null

rm -f target/debian/keyholder_*.deb
cargo deb --locked
ls target/debian/keyholder_*.deb
