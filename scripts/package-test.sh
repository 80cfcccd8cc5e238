#!/usr/bin/env bash
# Packaging tests, run by scripts/test.sh after `cargo test` (as root, on Debian 12):
#
# 1. The OpenBSD port (packaging/openbsd/check-port.sh): its structure, and crates.inc and
#    distinfo regenerated from Cargo.lock match the committed ones.
# 2. The Debian package: built with cargo-deb from the binary `cargo test` already built (stripped;
#    a release build would cost minutes for nothing the test looks at), linted with lintian (no
#    errors), installed with dpkg -i; files, owners, modes, conffile, user, systemd unit and man
#    page checked; the installed binary checks a config, runs as the `postern` user with
#    /var/lib/postern as data_dir and takes a message; a newer version is installed over it
#    and the message is read back over IMAPS; then remove keeps the data and purge deletes it.
#
# It installs and purges the package `postern` on this machine, so it refuses to run when a
# `postern` package it did not install itself is present.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

step() { printf '\n== package test: %s\n' "$*"; }
fail() { printf 'package test FAILED: %s\n' "$*" >&2; exit 1; }
# mode, owner and group of a path, e.g. "755 root root"
stat_of() { stat -c '%a %U %G' "$1"; }
expect_stat() {
    local got
    got=$(stat_of "$1") || fail "$1 is missing"
    [ "$got" = "$2" ] || fail "$1: mode/owner/group are '$got', expected '$2'"
}

packaging/openbsd/check-port.sh

step "Debian package"
start=$(date +%s)
marker=/var/lib/postern/.postern-package-test
if dpkg-query -W -f='${Status}' postern 2>/dev/null | grep -q 'ok installed\|config-files'; then
    [ -e "$marker" ] || fail "a postern package is installed on this machine; not touching it"
    dpkg --purge postern >/dev/null
fi

work=$(mktemp -d /tmp/postern-package-test.XXXXXX)
cleanup() {
    local status=$?
    if [ "$status" != 0 ] && [ -s "$work/postern.log" ]; then
        echo "--- stderr of the installed postern (last lines) ---" >&2
        tail -n 40 "$work/postern.log" >&2
    fi
    if dpkg-query -W -f='${Status}' postern 2>/dev/null | grep -q 'ok installed\|config-files'; then
        dpkg --purge postern >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
export POSTERN_TEST_LOG=$work/postern.log

# cargo-deb takes binaries from $CARGO_TARGET_DIR/release: give it a stripped copy of the test
# build there instead of building a release (the real package is `cargo deb`, see
# docs/install.md). Two versions from the same binary make the upgrade.
# POSTERN_PACKAGE_TEST_BINARY: package that binary instead (no build).
binary=${POSTERN_PACKAGE_TEST_BINARY:-target/debug/postern}
# `cargo test --no-run`, not `cargo build`: the same features as the test build (dev-dependencies
# enable some), so right after `cargo test` it compiles nothing and target/debug/postern stays.
[ -n "${POSTERN_PACKAGE_TEST_BINARY:-}" ] || cargo test --locked --no-run --quiet
mkdir -p "$work/target/release"
strip -o "$work/target/release/postern" "$binary"
version=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')
old_version="$version-0~pkgtest1"
new_version="$version-1"
dpkg --compare-versions "$new_version" gt "$old_version" || fail "version order"
for v in "$old_version" "$new_version"; do
    CARGO_TARGET_DIR="$work/target" cargo deb --no-build --locked --quiet --fast \
        --deb-version "$v" -o "$work/postern_$v.deb" >/dev/null
done
old_deb=$work/postern_$old_version.deb
new_deb=$work/postern_$new_version.deb

step "lintian"
lintian --fail-on error --allow-root --tag-display-limit 0 "$new_deb" || fail "lintian reports errors"

step "contents"
contents=$(dpkg-deb -c "$new_deb" | awk '{print $1, $2, $NF}')
for entry in \
    "-rwxr-xr-x 0/0 ./usr/bin/postern" \
    "-rw-r--r-- 0/0 ./etc/postern/postern.toml" \
    "-rw-r--r-- 0/0 ./lib/systemd/system/postern.service" \
    "-rw-r--r-- 0/0 ./usr/share/man/man8/postern.8.gz" \
    "-rw-r--r-- 0/0 ./usr/share/doc/postern/copyright" \
    "-rw-r--r-- 0/0 ./usr/share/doc/postern/install.md" \
    "-rw-r--r-- 0/0 ./usr/share/doc/postern/configuration.md"; do
    grep -qxF -- "$entry" <<<"$contents" || fail "the package lacks '$entry'"
done
dpkg-deb -e "$new_deb" "$work/control"
[ "$(cat "$work/control/conffiles")" = /etc/postern/postern.toml ] || fail "conffiles: $(cat "$work/control/conffiles")"
dpkg-deb -x "$new_deb" "$work/root"
cmp "$work/root/etc/postern/postern.toml" config.example.toml || fail "the conffile is not config.example.toml"
# The manual renders without warnings and names every command of the binary.
man_warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$work/root/usr/share/man/man8/postern.8.gz" 2>&1 >/dev/null)
[ -z "$man_warnings" ] || fail "postern(8): $man_warnings"
man_text=$(LC_ALL=C.UTF-8 MANWIDTH=200 man -l "$work/root/usr/share/man/man8/postern.8.gz" 2>/dev/null)
commands=$("$work/root/usr/bin/postern" --help | awk '/^Commands:/ {on=1; next} /^$/ {on=0} on && $1 != "help" {print $1}')
[ -n "$commands" ] || fail "no commands in postern --help"
for c in $commands; do
    sub=$("$work/root/usr/bin/postern" "$c" --help | awk '/^Commands:/ {on=1; next} /^$/ {on=0} on && $1 != "help" {print $1}')
    grep -q "^ *postern $c\b" <<<"$man_text" || fail "postern(8) has no synopsis for '$c'"
    for s in $sub; do
        grep -q "^ *postern $c $s\b\|^ *postern $c .*\b$s\b" <<<"$man_text" || fail "postern(8) lacks '$c $s'"
    done
done
for c in quickstart dns-check monitor "pause smtp" "resume smtp"; do
    grep -q "^ *postern $c\b" <<<"$man_text" || fail "postern(8) lacks '$c'"
done

step "install $old_version"
dpkg -i "$old_deb" >/dev/null
install -o postern -g postern -m 0640 /dev/null "$marker"
[ "$(dpkg-query -W -f='${Version} ${Status}' postern)" = "$old_version install ok installed" ] || fail "not installed"
expect_stat /usr/bin/postern "755 root root"
expect_stat /etc/postern "755 root root"
expect_stat /etc/postern/postern.toml "640 root postern"
expect_stat /var/lib/postern "750 postern postern"
expect_stat /lib/systemd/system/postern.service "644 root root"
cmp /etc/postern/postern.toml config.example.toml || fail "installed conffile differs from config.example.toml"
dpkg-query -W -f='${Conffiles}\n' postern | grep -q '^ /etc/postern/postern.toml [0-9a-f]\{32\}$' ||
    fail "/etc/postern/postern.toml is not a registered conffile"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd postern) || fail "no user postern"
[ "$uid" -lt 1000 ] || fail "postern is not a system user (uid $uid)"
[ "$(getent group postern | cut -d: -f3)" = "$gid" ] || fail "postern's primary group is not postern"
[ "$home" = /var/lib/postern ] || fail "postern's home is $home"
[ "$shell" = /usr/sbin/nologin ] || fail "postern's shell is $shell"
# Enabled for multi-user.target (by deb-systemd-helper, which works without systemd running).
[ -L /etc/systemd/system/multi-user.target.wants/postern.service ] || fail "the unit is not enabled"
unit=/lib/systemd/system/postern.service
for line in "User=postern" "Group=postern" "ExecStart=/usr/bin/postern serve --config /etc/postern/postern.toml" \
    "AmbientCapabilities=CAP_NET_BIND_SERVICE" "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" \
    "NoNewPrivileges=yes" "ProtectSystem=strict" "ReadWritePaths=/var/lib/postern" "ProtectHome=yes" \
    "PrivateTmp=yes" "ConditionPathExists=/etc/postern/postern.toml" "WantedBy=multi-user.target"; do
    grep -qxF "$line" "$unit" || fail "$unit lacks '$line'"
done
if command -v systemd-analyze >/dev/null; then
    # (--man=no where dpkg is told not to install manual pages, as in some container images)
    man_check=--man=yes
    [ -e /usr/share/man/man8/postern.8.gz ] || man_check=--man=no
    systemd-analyze verify "$man_check" "$unit" || fail "systemd-analyze verify $unit"
fi
# The shipped config is inert: it refers to certificate files that do not exist, so neither
# check-config nor the service accepts it until it is edited.
if out=$(/usr/bin/postern check-config 2>&1); then fail "the shipped config loads unedited: $out"; fi
grep -q '/etc/postern/tls/fullchain.pem' <<<"$out" || fail "check-config of the shipped config says: $out"

step "the installed binary: check-config, serve as postern, deliver"
export POSTERN_TEST_PASSWORD="package-test-$RANDOM$RANDOM"
POSTERN_TEST_HASH=$(printf '%s\n' "$POSTERN_TEST_PASSWORD" | /usr/bin/postern hash-password)
export POSTERN_TEST_HASH
python3 scripts/package-test-mail.py deliver first
chown root:postern /etc/postern/postern.toml && chmod 0640 /etc/postern/postern.toml
runuser -u postern -- /usr/bin/postern check-config >"$work/check.out" || fail "check-config as postern: $(cat "$work/check.out")"
grep -q 'pkgtest' "$work/check.out" || fail "check-config printed: $(cat "$work/check.out")"
expect_stat /var/lib/postern "750 postern postern"
[ -z "$(find /var/lib/postern ! -user postern)" ] || fail "files in /var/lib/postern not owned by postern: $(find /var/lib/postern ! -user postern)"
[ -z "$(find /var/lib/postern -perm /o=rwx)" ] || fail "files in /var/lib/postern readable by others: $(find /var/lib/postern -perm /o=rwx)"
cp /etc/postern/postern.toml "$work/edited.toml"

step "upgrade to $new_version"
dpkg -i "$new_deb" >/dev/null
[ "$(dpkg-query -W -f='${Version}' postern)" = "$new_version" ] || fail "not upgraded"
cmp /etc/postern/postern.toml "$work/edited.toml" || fail "the upgrade changed the edited config"
expect_stat /etc/postern/postern.toml "640 root postern"
expect_stat /var/lib/postern "750 postern postern"
python3 scripts/package-test-mail.py read first

step "remove keeps config and mail, purge deletes them"
dpkg --remove postern >/dev/null
[ ! -e /usr/bin/postern ] || fail "remove left /usr/bin/postern"
[ -e /etc/postern/postern.toml ] || fail "remove deleted the config"
[ -d /var/lib/postern/store ] || fail "remove deleted the store"
dpkg --purge postern >/dev/null
for path in /etc/postern /var/lib/postern /lib/systemd/system/postern.service \
    /etc/systemd/system/multi-user.target.wants/postern.service; do
    [ ! -e "$path" ] && [ ! -L "$path" ] || fail "purge left $path"
done
! dpkg-query -W -f='${Status}' postern 2>/dev/null | grep -q 'installed\|config-files' || fail "purge left the package"
# The system user stays (docs/install.md: Debian practice for system users).
getent passwd postern >/dev/null || fail "purge removed the user postern"

step "passed in $(($(date +%s) - start))s"
