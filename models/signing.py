"""Sign a bundle, outside the service: `python -m models.signing keygen | sign | verify`.

    python -m models.signing keygen --out keys/          # keys/bundle-signing.key (private, mode 0600) and .pub
    python -m models.signing sign --bundle DIR --key keys/bundle-signing.key          # writes DIR/bundle.sig
    python -m models.signing verify --bundle DIR --public-key keys/bundle-signing.pub

The signature is Ed25519 over the bundle digest (models/bundle.py: sha256 of the canonical manifest, which holds the
sha256 of every other file); the service verifies it at start-up when AEGIS_BUNDLE_PUBLIC_KEY_FILE is set. Keep the
private key off the serving hosts; only the public key goes there. Needs the `cryptography` package.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from models.bundle import SIGNATURE_FILE, BundleError, load_bundle, signed_message

PRIVATE_NAME, PUBLIC_NAME = "bundle-signing.key", "bundle-signing.pub"


def keygen(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / PRIVATE_NAME, out / PUBLIC_NAME
    if private.exists():
        raise FileExistsError(f"{private} exists: refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign(bundle_dir: Path, key_file: Path, out: Path | None = None) -> Path:
    """Verify the bundle's file hashes, then sign its digest; returns the signature file."""
    bundle = load_bundle(bundle_dir)
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{key_file} is not an Ed25519 private key")
    target = out or bundle_dir / SIGNATURE_FILE
    target.write_text(base64.b64encode(key.sign(signed_message(bundle.digest))).decode("ascii") + "\n",
                      encoding="ascii")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.signing", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("keygen", help="make an Ed25519 key pair")
    make.add_argument("--out", type=Path, required=True)
    signer = commands.add_parser("sign", help="sign a bundle (writes DIR/bundle.sig)")
    signer.add_argument("--bundle", type=Path, required=True)
    signer.add_argument("--key", type=Path, required=True)
    signer.add_argument("--signature", type=Path, default=None, help="where to write it (default DIR/bundle.sig)")
    checker = commands.add_parser("verify", help="verify a bundle's hashes and signature")
    checker.add_argument("--bundle", type=Path, required=True)
    checker.add_argument("--public-key", type=Path, required=True)
    checker.add_argument("--signature", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            private, public = keygen(args.out)
            print(f"private key {private} (keep it off the serving hosts), public key {public}")
        elif args.command == "sign":
            print(f"signed: {sign(args.bundle, args.key, args.signature)}")
        else:
            bundle = load_bundle(args.bundle, public_key_file=args.public_key, signature_file=args.signature)
            print(f"verified: {bundle.manifest.name} {bundle.manifest.version} digest {bundle.digest}")
    except (BundleError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
