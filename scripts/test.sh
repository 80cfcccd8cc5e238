#!/usr/bin/env bash
# The test command: installs what the tests talk to (swaks, Postfix, mbsync, Python, Pebble, DKIM
# and SRS reference tools), then checks formatting and lints, and runs every test against the real binary.
# Runs as root on Debian 12 (CI and developer machines); safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v swaks >/dev/null || packages+=(swaks libnet-ssleay-perl libio-socket-ssl-perl libnet-dns-perl libauthen-sasl-perl)
command -v smtp-source >/dev/null || packages+=(postfix)
command -v mbsync >/dev/null || packages+=(isync)
command -v python3 >/dev/null || packages+=(python3)
# Real IMAP clients for tests/imap_clients.rs: offlineimap, mutt; imapclient comes from PyPI below.
command -v offlineimap >/dev/null || packages+=(offlineimap3)
command -v mutt >/dev/null || packages+=(mutt)
python3 -c 'import imapclient' 2>/dev/null || python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
command -v mount >/dev/null || packages+=(mount)
command -v pebble >/dev/null || packages+=(pebble)
command -v curl >/dev/null || packages+=(curl)
# DKIM and SRS references: dkimpy (dkimsign/dkimverify), OpenDKIM's opendkim-testmsg, postsrsd,
# pyspf; dnsmasq serves DNS on port 53 to programs that only use the system resolver.
command -v dkimverify >/dev/null || packages+=(python3-dkim python3-dnspython)
command -v opendkim-testmsg >/dev/null || packages+=(opendkim-tools)
command -v opendkim >/dev/null || packages+=(opendkim)
command -v dnsmasq >/dev/null || packages+=(dnsmasq-base)
command -v postsrsd >/dev/null || packages+=(postsrsd)
python3 -c 'import spf' 2>/dev/null || packages+=(python3-spf)
# Packaging tests (scripts/package-test.sh): lintian, dpkg-shlibdeps for cargo-deb, man, and
# what the package's maintainer scripts use.
command -v lintian >/dev/null || packages+=(lintian)
command -v dpkg-shlibdeps >/dev/null || packages+=(dpkg-dev)
command -v man >/dev/null || packages+=(man-db)
command -v adduser >/dev/null || packages+=(adduser)
command -v deb-systemd-helper >/dev/null || packages+=(init-system-helpers)
if ((${#packages[@]})); then
    # Packages must not start daemons here (postfix would take port 25): deny service starts.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
    fi
    echo "installing: ${packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
# imapclient into the python3 the tests run (Debian's is externally managed, hence the flag).
python3 -c 'import imapclient' 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages imapclient==4.1.0

# A fresh checkout gains nothing from incremental state, and it costs gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
# Fuzz the IMAP command parser for a minute (fuzz/: its own workspace and target dir; libFuzzer
# without sanitizers runs on stable rustc). Entries it discovers go to a scratch corpus, so the
# seeds in git stay as they are; a crash fails the run and leaves its input in fuzz/artifacts/.
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
fuzz_corpus=$(mktemp -d)
(cd fuzz && CARGO_TARGET_DIR="$PWD/target" cargo fuzz run --sanitizer none imap_command "$fuzz_corpus" \
    corpus/imap_command -- -max_total_time=60 -timeout=10 -rss_limit_mb=1024 -print_final_stats=1)
rm -rf "$fuzz_corpus"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0
scripts/package-test.sh
