"""TLS and mutual TLS against live dev servers started with TF Serving's SSL config format.

Certificates are made here with the ``openssl`` command (a CA, a server certificate for
127.0.0.1/localhost, a client certificate, and a second CA with its own client certificate that
the servers must not trust); the servers serve the ``tiny_run`` fixture's SavedModel.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_export import jpeg_tiles
from test_serving import launch, wait_ready

from lungtf.client import LungClient, LungClientError, channel_credentials
from lungtf.client import main as client_main
from lungtf.serving.__main__ import main as serving_main
from lungtf.serving.tls import format_ssl_config, read_ssl_config

REPO = Path(__file__).resolve().parents[1]
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> None:
    openssl(
        folder, "req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.crt",
        "-days", "2", "-subj", f"/CN=lungtf test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def make_leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    """``name.key`` and ``name.crt`` signed by ``ca`` with the given v3 extensions."""
    openssl(
        folder, "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"
    )
    (folder / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{extensions}\n")
    openssl(
        folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("certs")
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
    make_leaf(folder, "server", "ca", server_ext)
    make_leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth")
    make_leaf(folder, "stranger", "other-ca", "extendedKeyUsage=clientAuth")
    return folder


@pytest.fixture(scope="module")
def servers(certs: Path, tiny_run: Path) -> Iterator[dict]:
    """Two dev servers over the tiny run's SavedModel: ``tls`` (no client certificate asked)
    and ``mutual`` (``client_verify: true``), both from ``ssl-config`` files."""
    procs, targets = {}, {}
    for name, verify in (("tls", False), ("mutual", True)):
        config = certs / f"{name}.config"
        config.write_text(
            format_ssl_config(certs / "server.key", certs / "server.crt", certs / "ca.crt", verify)
        )
        args = ["--model-base-path", str(tiny_run / "best" / "saved_model"), "--ssl-config"]
        procs[name] = launch([*args, str(config)], certs / f"{name}.log")
    trusted = channel_credentials(certs / "ca.crt", certs / "client.crt", certs / "client.key")
    for name, proc in procs.items():
        targets[name] = wait_ready(proc, certs / f"{name}.log", credentials=trusted)
    yield targets
    for proc in procs.values():
        proc.terminate()
        proc.wait(timeout=60)


def refusal(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status a client with ``credentials`` (plaintext when ``None``) gets for ``status``."""
    client = LungClient(target, timeout=10, retries=0, credentials=credentials)
    try:
        client.status()
    except LungClientError as err:
        return err.code
    finally:
        client.close()
    return grpc.StatusCode.OK


def test_ssl_config_is_tf_servings_format_and_checked(
    certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    example = read_ssl_config(REPO / "serving" / "ssl_config.example")
    assert example.client_verify and example.custom_ca.startswith("-----BEGIN CERTIFICATE-----\n")
    key, cert, ca = (str(certs / n) for n in ("server.key", "server.crt", "ca.crt"))
    assert serving_main(["ssl-config", "--key", key, "--cert", cert, "--ca", ca]) == 0
    (tmp_path / "ok.config").write_text(capsys.readouterr().out)
    parsed = read_ssl_config(tmp_path / "ok.config")
    assert parsed.server_key == Path(key).read_text() and parsed.custom_ca == Path(ca).read_text()
    assert not parsed.client_verify
    assert serving_main(["ssl-config", "--key", key, "--cert", cert]) == 0
    without_ca = capsys.readouterr().out
    bad = {
        "paths": (f'server_key: "{key}"\nserver_cert: "{cert}"', "not PEM text"),
        "no_ca": (f"{without_ca}client_verify: true\n", "custom_ca is empty"),
        "typo": ('server_keys: "x"', "not a text-format tensorflow.serving.SSLConfig"),
        "no_key": ('custom_ca: "-----BEGIN CERTIFICATE-----"', "server_key is empty"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_ssl_config(tmp_path / name)
        args = ["serve", "--model-base-path", str(tmp_path), "--ssl-config", str(tmp_path / name)]
        assert serving_main(args) == 2
        assert message in capsys.readouterr().err
    assert serving_main(["ssl-config", "--key", key, "--cert", cert, "--client-verify"]) == 2


def test_tls_client_with_the_ca_is_answered(servers: dict, certs: Path, tmp_path: Path) -> None:
    client = LungClient(servers["tls"], credentials=channel_credentials(certs / "ca.crt"))
    predictions = client.predict(jpeg_tiles(3))
    assert len(predictions) == 3 and all(
        abs(sum(p.probabilities.values()) - 1) < 1e-4 for p in predictions
    )
    assert client.metadata()["image_size"] == 64
    client.close()
    tls = ["--tls-ca", str(certs / "ca.crt")]
    mutual = [*tls, "--tls-cert", str(certs / "client.crt"), "--tls-key", str(certs / "client.key")]
    assert client_main(["status", "--target", servers["tls"], *tls]) == 0
    assert client_main(["status", "--target", servers["mutual"], *mutual]) == 0
    tile = tmp_path / "tile.jpeg"
    tile.write_bytes(jpeg_tiles(1)[0])
    assert client_main(["predict", "--target", servers["tls"], *tls, str(tile)]) == 0
    assert client_main(["status", "--target", servers["tls"], "--tls-cert", str(tile)]) == 2


def test_client_without_the_ca_is_refused(servers: dict, certs: Path) -> None:
    for target in servers.values():
        assert refusal(target, grpc.ssl_channel_credentials()) == grpc.StatusCode.UNAVAILABLE
        other = channel_credentials(certs / "other-ca.crt")
        assert refusal(target, other) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    servers: dict, certs: Path
) -> None:
    ca = certs / "ca.crt"
    with_cert = channel_credentials(ca, certs / "client.crt", certs / "client.key")
    assert refusal(servers["mutual"], with_cert) == grpc.StatusCode.OK
    assert refusal(servers["mutual"], channel_credentials(ca)) == grpc.StatusCode.UNAVAILABLE
    stranger = channel_credentials(ca, certs / "stranger.crt", certs / "stranger.key")
    assert refusal(servers["mutual"], stranger) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_clients_are_refused(servers: dict) -> None:
    for target in servers.values():
        assert refusal(target, None) == grpc.StatusCode.UNAVAILABLE


def test_demo_talks_tls(servers: dict, certs: Path) -> None:
    from lungtf import demo

    tls = ["--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "client.crt")]
    args = demo.parse_args(
        ["--target", servers["mutual"], *tls, "--tls-key", str(certs / "client.key")]
    )
    backend = demo.DemoBackend(args.target, credentials=demo.credentials_from_args(args))
    assert "version 1" in backend.footer()
    assert demo.main(["--target", servers["mutual"], *tls]) == 2  # a certificate without its key
