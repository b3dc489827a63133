"""The demo's identity provider: a real oidc-provider with demo clients, plus seed
refresh tokens written where ./config.yaml expects them."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from tests.idp_harness import IdP, default_clients, make_test_keys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9400)
    parser.add_argument("--out", type=Path, default=Path("var/demo"))
    parser.add_argument("--access-token-ttl", type=int, default=60)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    keys = make_test_keys(out / "keys")
    idp = IdP(
        out / "idp",
        clients=default_clients(keys["ec_public_jwk"], keys["rsa_public_jwk"]),
        access_token_ttl=args.access_token_ttl,
        port=args.port,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with idp.start():
        (out / "basic-client.secret").write_text("basic-secret\n")
        (out / "cc-client.secret").write_text("s3cr:et/+&%=\n")
        for account in ("alice", "bob"):
            token = idp.seed("basic-client", "openid offline_access read profile", account)
            seed = out / f"{account}.refresh_token"
            seed.write_text(token + "\n")
            seed.chmod(0o600)
        (out / "ready").write_text(idp.issuer)
        stop.wait()


if __name__ == "__main__":
    main()
