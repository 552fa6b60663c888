#!/usr/bin/env bash
# kingdom-edge vs nginx vs HAProxy (and Varnish for cache hits), side by side in one run.
# Installs what is missing (nginx, haproxy, varnish and wrk from Debian packages, oha from
# crates.io), builds kingdom-edge in release
# mode, then runs bench/compare.py. Arguments are passed on, e.g. `--rounds 5 --duration 15`.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${BENCH_TOOLS:-$PWD/bench/.tools}"
as_root=""
[ "$(id -u)" -eq 0 ] || as_root="sudo"

need=()
for tool in nginx haproxy wrk cmake; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
command -v varnishd >/dev/null 2>&1 || need+=(varnish)
if [ ${#need[@]} -gt 0 ]; then
  $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -x "$tools/bin/oha" ]; then
  cargo install oha --version 1.16.0 --locked --root "$tools"
fi
cargo build --release --locked --bin kingdom-edge

# 5,000 idle client connections need more than the usual 1,024 descriptors: raise to the hard limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/compare.py --kingdom target/release/kingdom-edge --tools "$tools" "$@"
