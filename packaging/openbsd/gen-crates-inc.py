#!/usr/bin/env python3
"""Writes the OpenBSD port's crates.inc and distinfo from Cargo.lock.

    packaging/openbsd/gen-crates-inc.py [--out DIR] [--offline]

crates.inc gets one line per crates.io package of Cargo.lock, in Cargo.lock's order, as the ports
tree's `make modcargo-gen-crates-licenses` writes them:

    MODCARGO_CRATES +=	NAME	VERSION	# LICENSE

distinfo gets the SHA256 (base64, as OpenBSD's makesum writes it) and SIZE of every distfile:
the crates as cargo/NAME-VERSION.tar.gz (the files crates.io serves are byte for byte the .crate
files cargo keeps in its registry cache, whose SHA256 Cargo.lock records), and the source
tarball postern-VERSION.tar.gz, made here with `git archive` of HEAD: run `make makesum` on
OpenBSD against the published release tarball before importing the port.

The crate files come from cargo's cache ($CARGO_HOME/registry/cache); `cargo fetch --locked` is
run first to complete it (all targets, so Windows-only crates too) unless --offline is given.
Run this after every change of Cargo.lock; packaging/openbsd/check-port.sh compares the result
with the committed files.
"""

import argparse
import base64
import glob
import hashlib
import os
import subprocess
import sys
import tarfile
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PORT = os.path.join(HERE, "mail", "postern")
CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"


def crate_file(name, version):
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    for path in glob.glob(os.path.join(home, "registry", "cache", "*", f"{name}-{version}.crate")):
        return path
    sys.exit(f"gen-crates-inc: {name}-{version}.crate is not in cargo's cache; run `cargo fetch --locked`")


def license_of(path, name, version):
    """The `license` of the crate's Cargo.toml, as modcargo-gen-crates-licenses reads it."""
    with tarfile.open(path, "r:gz") as tar:
        member = tar.extractfile(f"{name}-{version}/Cargo.toml")
        manifest = tomllib.loads(member.read().decode())
    return manifest.get("package", {}).get("license") or "XXX missing license"


def sha256_b64(data):
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=PORT, help="directory for crates.inc and distinfo (default: the port)")
    parser.add_argument("--offline", action="store_true", help="do not run `cargo fetch`")
    args = parser.parse_args()

    if not args.offline:
        subprocess.run(["cargo", "fetch", "--locked", "--quiet"], cwd=REPO, check=True)
    with open(os.path.join(REPO, "Cargo.lock"), "rb") as f:
        lock = tomllib.load(f)
    with open(os.path.join(REPO, "Cargo.toml"), "rb") as f:
        version = tomllib.load(f)["package"]["version"]

    lines = []
    sums = {}
    for package in lock["package"]:
        source = package.get("source")
        if source is None:
            continue  # postern itself
        name, ver = package["name"], package["version"]
        if source != CRATES_IO:
            sys.exit(f"gen-crates-inc: {name} {ver} comes from {source}, not crates.io: the port cannot fetch it")
        path = crate_file(name, ver)
        with open(path, "rb") as f:
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != package.get("checksum"):
            sys.exit(f"gen-crates-inc: {path} does not have the checksum Cargo.lock records")
        lines.append(f"MODCARGO_CRATES +=\t{name}\t{ver}\t# {license_of(path, name, ver)}\n")
        sums[f"cargo/{name}-{ver}.tar.gz"] = (sha256_b64(data), len(data))

    distname = f"postern-{version}"
    tarball = subprocess.run(
        ["git", "archive", "--format=tar.gz", f"--prefix={distname}/", "HEAD"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    sums[f"{distname}.tar.gz"] = (sha256_b64(tarball), len(tarball))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "crates.inc"), "w") as f:
        f.writelines(lines)
    names = sorted(sums)
    with open(os.path.join(args.out, "distinfo"), "w") as f:
        for n in names:
            f.write(f"SHA256 ({n}) = {sums[n][0]}\n")
        for n in names:
            f.write(f"SIZE ({n}) = {sums[n][1]}\n")


if __name__ == "__main__":
    main()
