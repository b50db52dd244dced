"""DICOM TLS to a destination: results reach DCMTK ``storescp +tls`` (which requires the
node's client certificate), and the Test button says what is wrong with a certificate in
plain words (unknown CA, no client certificate)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers_dicom import write_ct_series

from ct_ai_node.config import NodeConfig, load_config
from ct_ai_node.egress import DestinationError, destination_from_config
from ct_ai_node.egress.probe import probe_destination
from ct_ai_node.peers import dcmtk_tool, free_port, nodelay_env, wait_for_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or dcmtk_tool("storescp") is None,
                                reason="openssl or DCMTK storescp not installed (make test installs them)")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(cert))
    return cert, key


def _signed(folder: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem",
                           folder / f"{name}.ext")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
    ext.write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = _ca(folder, "hospital-ca")
    other_ca = _ca(folder, "other-ca")
    server = _signed(folder, "pacs", ca, "IP:127.0.0.1,DNS:localhost")
    client = _signed(folder, "ctai", ca, "DNS:ctai.example.org")
    return {"ca": ca[0], "other_ca": other_ca[0], "server": server, "client": client}


@pytest.fixture
def tls_storescp(tmp_path, pki):
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    cert, key = pki["server"]
    proc = subprocess.Popen([dcmtk_tool("storescp"), "+tls", str(key), str(cert), "+cf", str(pki["ca"]), "-rc",
                             "-od", str(out), "-aet", "TLSPACS", str(port)],
                            env=nodelay_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_port(port, 30, proc)
    yield port, out
    proc.terminate()
    proc.wait(10)


def _config(port: int, **tls) -> NodeConfig:
    return NodeConfig.model_validate({"destinations": [
        {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": "TLSPACS", "tls": tls}]})


def test_results_reach_a_tls_storescp_and_the_test_button_explains_certificates(tmp_path, pki, tls_storescp):
    port, received = tls_storescp
    client_cert, client_key = pki["client"]
    good = _config(port, ca=pki["ca"], cert=client_cert, key=client_key)
    echo = probe_destination(good, "pacs")
    assert echo.ok and "TLS" in echo.message and "answered success" in echo.message, echo.message

    files = write_ct_series(tmp_path / "s", n=3, rows=16, cols=16).paths
    report = destination_from_config(good.destinations[0]).send(files)
    assert report.total == 3
    deadline = time.monotonic() + 10
    while len(list(received.iterdir())) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(received.iterdir())) == 3

    # a CA that did not sign the PACS's certificate: said so, and not retried for ever
    wrong_ca = _config(port, ca=pki["other_ca"], cert=client_cert, key=client_key)
    echo = probe_destination(wrong_ca, "pacs")
    assert not echo.ok and "certificate problem" in echo.message and "tls.ca" in echo.message, echo.message
    with pytest.raises(DestinationError) as err:
        destination_from_config(wrong_ca.destinations[0]).send(files[:1])
    assert "certificate problem" in str(err.value) and not err.value.retryable

    # no client certificate: the PACS refuses the handshake
    no_client = _config(port, ca=pki["ca"])
    echo = probe_destination(no_client, "pacs")
    assert not echo.ok and "client certificate" in echo.message, echo.message


def test_tls_files_are_checked_and_resolved(tmp_path, pki):
    (tmp_path / "node.yaml").write_text(
        "destinations:\n- name: pacs\n  kind: dicom\n  host: 127.0.0.1\n  port: 2762\n  ae_title: PACS\n"
        "  tls: {ca: certs/ca.pem, cert: certs/ctai.pem}\n")
    from ct_ai_node.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "node.yaml", base=tmp_path)
    assert err.value.problems == ["destinations.0.tls.key: cert and key go together"]
    (tmp_path / "node.yaml").write_text(
        "destinations:\n- name: pacs\n  kind: dicom\n  host: 127.0.0.1\n  port: 2762\n  ae_title: PACS\n"
        "  tls: {ca: certs/ca.pem}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "node.yaml", base=tmp_path)
    assert err.value.problems == [f"destinations.0.tls.ca: file {tmp_path / 'certs/ca.pem'} not found"]
    (tmp_path / "certs").mkdir()
    shutil.copy(pki["ca"], tmp_path / "certs" / "ca.pem")
    config = load_config(tmp_path / "node.yaml", base=tmp_path)
    assert config.destinations[0].tls.ca == tmp_path / "certs" / "ca.pem"
