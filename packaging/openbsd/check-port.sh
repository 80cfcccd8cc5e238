#!/usr/bin/env bash
# Checks the OpenBSD port in packaging/openbsd/mail/postern without an OpenBSD machine: the files
# a port needs, the Makefile variables of the cargo module, the PLIST against what the Makefile
# installs, the rc.d script, and that crates.inc and distinfo are what gen-crates-inc.py makes
# from the current Cargo.lock. Run by scripts/package-test.sh (the test command).
set -euo pipefail
cd "$(dirname "$0")/../.."
port=packaging/openbsd/mail/postern
errors=0
bad() { printf 'OpenBSD port: %s\n' "$*" >&2; errors=$((errors + 1)); }
has_line() { grep -qxE -- "$2" "$1" || bad "$1 has no line matching /$2/"; }

echo "== package test: OpenBSD port"
for f in Makefile crates.inc distinfo pkg/DESCR pkg/PLIST pkg/README pkg/postern.rc; do
    [ -s "$port/$f" ] || bad "$port/$f is missing or empty"
done
((errors == 0)) || exit 1

# Makefile: the cargo module, the version of Cargo.toml, crates.inc included before bsd.port.mk.
mk=$port/Makefile
version=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["package"]["version"])')
has_line "$mk" 'MODULES =[[:space:]]+devel/cargo'
has_line "$mk" 'CONFIGURE_STYLE =[[:space:]]+cargo'
has_line "$mk" "V =[[:space:]]+${version//./\\.}"
has_line "$mk" 'DISTNAME =[[:space:]]+postern-\$\{V\}'
has_line "$mk" 'CATEGORIES =[[:space:]]+mail'
has_line "$mk" 'PERMIT_PACKAGE =[[:space:]]+Yes'
has_line "$mk" 'WANTLIB \+=[[:space:]]+\$\{MODCARGO_WANTLIB\}.*'
has_line "$mk" 'SITES =[[:space:]]+https://.*/'
comment=$(sed -n 's/^COMMENT =[[:space:]]*//p' "$mk")
[ -n "$comment" ] && [ ${#comment} -le 60 ] || bad "COMMENT must be set and at most 60 characters: '$comment'"
[[ "$comment" =~ ^[a-z] && ! "$comment" =~ \.$ && ! "$comment" =~ ^(a|an|the)\  ]] ||
    bad "COMMENT starts in lower case, without an article, and has no final period: '$comment'"
inc=$(grep -n '^\.include "crates.inc"$' "$mk" | cut -d: -f1)
bsd=$(grep -n '^\.include <bsd.port.mk>$' "$mk" | cut -d: -f1)
[ -n "$inc" ] && [ -n "$bsd" ] && [ "$inc" -lt "$bsd" ] || bad "$mk must include crates.inc before <bsd.port.mk>"
grep -q $'^\t' "$mk" || bad "$mk: recipes must be indented with tabs"
! grep -qE '^ +\$\{' "$mk" || bad "$mk: a recipe line is indented with spaces"
awk 'length > 80 { exit 1 }' "$port/pkg/DESCR" || bad "pkg/DESCR has lines over 80 characters"

# PLIST: the user and group, the binary, the manual, the rc script, the pkg-readme, the sample
# config, the data directory, and every file post-install writes.
plist=$port/pkg/PLIST
has_line "$plist" '@newgroup _postern:[0-9]+'
has_line "$plist" '@newuser _postern:[0-9]+:_postern::[^:]+:/var/postern:/sbin/nologin'
uid=$(sed -n 's/^@newuser _postern:\([0-9]*\):.*/\1/p' "$plist")
gid=$(sed -n 's/^@newgroup _postern:\([0-9]*\)$/\1/p' "$plist")
[ "$uid" = "$gid" ] || bad "_postern uid $uid and gid $gid differ"
has_line "$plist" '@rcscript \$\{RCDIR\}/postern'
has_line "$plist" '@bin bin/postern'
has_line "$plist" '@man man/man8/postern\.8'
has_line "$plist" 'share/doc/pkg-readmes/\$\{PKGSTEM\}'
has_line "$plist" 'share/examples/postern/postern\.toml'
has_line "$plist" '@sample \$\{SYSCONFDIR\}/postern/postern\.toml'
has_line "$plist" '@sample /var/postern/'
grep -A1 -x 'share/examples/postern/postern.toml' "$plist" | grep -q '^@' ||
    bad "PLIST: the example config must be followed by the annotations of its @sample"
for f in $(sed -n 's/^\.for f in //p' "$mk"); do
    [ -f "$f" ] || bad "the Makefile installs $f, which is not in the source tree"
    has_line "$plist" "share/doc/postern/$(basename "$f" | sed 's/\./\\./g')"
done
[ -f packaging/postern.8 ] || bad "packaging/postern.8 is missing"
[ -f config.example.toml ] || bad "config.example.toml is missing"
grep -q '"/var/lib/postern"' config.example.toml || bad "the Makefile's sed no longer finds data_dir in config.example.toml"

# rc.d script (rc.d(8), rc.subr(8)).
rc=$port/pkg/postern.rc
if command -v ksh >/dev/null; then ksh -n "$rc" || bad "$rc: syntax"; else bash -n "$rc" || bad "$rc: syntax"; fi
[ "$(head -n1 "$rc")" = '#!/bin/ksh' ] || bad "$rc must start with #!/bin/ksh"
has_line "$rc" 'daemon="\$\{TRUEPREFIX\}/bin/postern"'
has_line "$rc" 'daemon_flags="serve --config \$\{SYSCONFDIR\}/postern/postern\.toml"'
has_line "$rc" 'daemon_user="_postern"'
has_line "$rc" '\. /etc/rc\.d/rc\.subr'
has_line "$rc" 'rc_bg=YES'
[ "$(grep -v '^$' "$rc" | tail -n1)" = 'rc_cmd $1' ] || bad "$rc must end with rc_cmd \$1"
grep -n '^[a-z_]*=' "$rc" | awk -F: -v subr="$(grep -n 'rc.subr' "$rc" | cut -d: -f1)" \
    '$2 ~ /^daemon/ && $1 > subr { exit 1 }' || bad "$rc: daemon* variables must be set before rc.subr"

# pkg-readme: how to enable it, the user, the DNS records.
readme=$port/pkg/README
for phrase in 'rcctl enable postern' '_postern' 'postern dns-records' 'postern check-config' '${SYSCONFDIR}/postern/postern.toml'; do
    grep -qF -- "$phrase" "$readme" || bad "pkg/README does not mention '$phrase'"
done
awk 'length > 80 { exit 1 }' "$readme" || bad "pkg/README has lines over 80 characters"

# crates.inc and distinfo against Cargo.lock.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 packaging/openbsd/gen-crates-inc.py --out "$scratch"
diff -u "$port/crates.inc" "$scratch/crates.inc" >&2 ||
    bad "crates.inc does not match Cargo.lock: run packaging/openbsd/gen-crates-inc.py"
# The source tarball's line changes with every commit; only the crates must match exactly.
diff -u <(grep 'cargo/' "$port/distinfo") <(grep 'cargo/' "$scratch/distinfo") >&2 ||
    bad "distinfo's crates do not match Cargo.lock: run packaging/openbsd/gen-crates-inc.py"
has_line "$port/distinfo" "SHA256 \(postern-${version//./\\.}\.tar\.gz\) = [A-Za-z0-9+/]{43}="
has_line "$port/distinfo" "SIZE \(postern-${version//./\\.}\.tar\.gz\) = [0-9]+"
crates=$(grep -c . "$port/crates.inc")
locked=$(grep -c '^source = "registry+https://github.com/rust-lang/crates.io-index"$' Cargo.lock)
[ "$crates" = "$locked" ] || bad "crates.inc has $crates crates, Cargo.lock $locked"

((errors == 0)) || { echo "OpenBSD port: $errors problem(s)" >&2; exit 1; }
echo "OpenBSD port: structure, PLIST, rc script, and $crates crates in crates.inc and distinfo match"
