"""Node configuration: the example file, problem lines naming the field, check-config
and `rules test` on the command line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ct_ai_node.cli import EXIT_REJECTED, app
from ct_ai_node.config import (
    ConfigError,
    DicomDestination,
    NodeConfig,
    OrthancDestination,
    StowDestination,
    default_config,
    load_config,
    parse_config,
)
from helpers_dicom import write_ct_series

EXAMPLE = Path(__file__).resolve().parents[1] / "deployment" / "node.example.yaml"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

#: a small valid file; cases below replace one part of it
BASE = """\
node: {ae_title: CTAI, port: 11112}
storage: {root: ./var}
destinations:
  - {name: pacs, kind: dicom, host: 127.0.0.1, port: 4242, ae_title: ORTHANC}
rules:
  - name: chest-ct
    when:
      - {tag: Modality, equals: CT}
    action: analyse
    destinations: [pacs]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert info.value.problems, "a ConfigError must say what is wrong"
    return info.value.problems


# -- the example ----------------------------------------------------------------

def test_example_loads_as_documented(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(EXAMPLE)
    assert cfg.node.ae_title == "CTAI" and cfg.node.port == 11112
    assert len(cfg.destinations) == 1
    dest = cfg.destinations[0]
    assert isinstance(dest, DicomDestination)
    assert (dest.host, dest.port, dest.ae_title) == ("127.0.0.1", 4242, "ORTHANC")
    assert dest.calling_ae(cfg.node.ae_title) == "CTAI"
    assert len(cfg.rules) == 1
    rule = cfg.rules[0]
    assert rule.action == "analyse" and rule.pipeline == "radlogics"
    assert rule.destinations == [dest.name]
    # relative storage root resolved against the working directory
    assert cfg.storage.root == tmp_path / "var"
    assert cfg.storage.spool_dir == tmp_path / "var" / "spool"
    assert cfg.storage.db_path == tmp_path / "var" / "node.db"
    assert cfg.storage.outbox_dir == tmp_path / "var" / "outbox"


def test_example_is_the_design_document_schema():
    # the full YAML of docs/node.md, all three destination kinds
    text = """
    node: {ae_title: CTAI, host: 0.0.0.0, port: 11112, max_associations: 8,
           acse_timeout_s: 30, dimse_timeout_s: 60, network_timeout_s: 60}
    tls: null
    allowed_callers:
      - {ae_title: PACS, host: 127.0.0.1}
    storage: {root: ./var, min_free_mb: 2048}
    completeness: {quiet_time_s: 20, check_interval_s: 2}
    workers: {count: 1, lease_s: 120, device: auto}
    retry: {max_attempts: 5, backoff_initial_s: 5, backoff_max_s: 300}
    destinations:
      - {name: pacs, kind: dicom, host: 127.0.0.1, port: 4242, ae_title: ORTHANC, calling_ae_title: CTAI}
      - {name: web, kind: stow, url: http://127.0.0.1:8042/dicom-web, username: null, password: null}
      - {name: orthanc-rest, kind: orthanc, url: http://127.0.0.1:8042, username: null, password: null}
    routing: {mode: first, fallback: {action: discard}}
    rules:
      - name: chest-ct
        when:
          - {tag: Modality, equals: CT}
          - {tag: BodyPartExamined, in: [CHEST, THORAX, LUNG, ""]}
          - {tag: SeriesDescription, regex: "(?i)lung|chest|thorax"}
          - {tag: SliceThickness, range: [0.5, 5]}
          - {tag: ContrastBolusAgent, exists: false}
          - {calling_ae: {in: [PACS]}}
          - {instances: {range: [20, 2000]}}
          - {image_type: {contains: AXIAL}}
          - {orientation: {equals: axial}}
        action: analyse
        pipeline: radlogics
        lungs: unet
        destinations: [pacs]
    """
    import yaml

    cfg = parse_config(yaml.safe_load(textwrap.dedent(text)))
    kinds = [type(d) for d in cfg.destinations]
    assert kinds == [DicomDestination, StowDestination, OrthancDestination]
    assert [c.target for c in cfg.rules[0].when] == [
        "tag", "tag", "tag", "tag", "tag", "calling_ae", "instances", "image_type", "orientation"]
    assert cfg.rules[0].when[1].test == ("in", ["CHEST", "THORAX", "LUNG", ""])
    assert cfg.caller_allowed("PACS", "127.0.0.1") and not cfg.caller_allowed("PACS", "10.0.0.9")
    assert not cfg.caller_allowed("OTHER", "127.0.0.1")


# -- problems name the field ----------------------------------------------------

CASES = {
    "port out of range": (
        BASE.replace("port: 4242", "port: 70000"),
        "destinations.0.port: Input should be less than 65536",
    ),
    "node port zero": (
        BASE.replace("port: 11112", "port: 0"),
        "node.port: Input should be greater than or equal to 1",
    ),
    "unknown key": (
        BASE.replace("storage: {root: ./var}", "storage: {root: ./var, colour: blue}"),
        "storage.colour: unknown field",
    ),
    "unknown section": (
        BASE + "logging: {level: debug}\n",
        "logging: unknown field",
    ),
    "unknown destination in rule": (
        BASE.replace("destinations: [pacs]", "destinations: [pacs, archive]"),
        "rules.0.destinations.1: unknown destination 'archive' (destinations: pacs)",
    ),
    "backslash in AE title": (
        BASE.replace("ae_title: CTAI", "ae_title: 'CT\\AI'"),
        "node.ae_title: an AE title may not contain '\\\\'",
    ),
    "AE title too long": (
        BASE.replace("ae_title: ORTHANC", "ae_title: ORTHANC_SERVER_NUMBER_ONE"),
        "destinations.0.ae_title: an AE title has at most 16 characters, got 25",
    ),
    "AE title all spaces": (
        BASE.replace("ae_title: CTAI", "ae_title: '   '"),
        "node.ae_title: an AE title must not be empty or all spaces",
    ),
    "bad regex": (
        BASE.replace("{tag: Modality, equals: CT}", "{tag: SeriesDescription, regex: '(lung'}"),
        "rules.0.when.0.regex: invalid regular expression: missing ), unterminated subpattern at position 0",
    ),
    "two operators": (
        BASE.replace("{tag: Modality, equals: CT}", "{tag: Modality, equals: CT, in: [CT, MR]}"),
        "rules.0.when.0: a condition needs exactly one operator (equals, in, regex, range, exists, contains); "
        "found 2: equals, in",
    ),
    "two operators nested": (
        BASE.replace("{tag: Modality, equals: CT}", "{calling_ae: {equals: PACS, regex: P}}"),
        "rules.0.when.0.calling_ae: a condition needs exactly one operator (equals, in, regex, range, exists, "
        "contains); found 2: equals, regex",
    ),
    "no operator": (
        BASE.replace("{tag: Modality, equals: CT}", "{tag: Modality}"),
        "rules.0.when.0: a condition needs exactly one operator (equals, in, regex, range, exists, contains); "
        "found none",
    ),
    "unknown keyword": (
        BASE.replace("{tag: Modality, equals: CT}", "{tag: Modalty, equals: CT}"),
        "rules.0.when.0.tag: 'Modalty' is not a DICOM keyword (did you mean Modality?)",
    ),
    "sequence keyword": (
        BASE.replace("{tag: Modality, equals: CT}", "{tag: ReferencedImageSequence, exists: true}"),
        "rules.0.when.0.tag: ReferencedImageSequence is a sequence or binary data; rules see plain values only",
    ),
    "range reversed": (
        BASE.replace("{tag: Modality, equals: CT}", "{tag: SliceThickness, range: [5, 0.5]}"),
        "rules.0.when.0.range: lower bound 5 is above upper bound 0.5",
    ),
    "orientation value": (
        BASE.replace("{tag: Modality, equals: CT}", "{orientation: {equals: transverse}}"),
        "rules.0.when.0.orientation.equals: 'transverse' is not one of axial, coronal, sagittal, oblique, unknown",
    ),
    "unquoted NO": (
        BASE.replace("{tag: Modality, equals: CT}", "{tag: BodyPartExamined, equals: NO}"),
        "rules.0.when.0.equals: YAML read this as true/false; quote the value (\"YES\", \"NO\", \"ON\", \"OFF\")",
    ),
    "forward without destinations": (
        BASE.replace("action: analyse\n    destinations: [pacs]", "action: forward"),
        "rules.0.destinations: a forward rule needs at least one destination",
    ),
    "discard with pipeline": (
        BASE.replace("action: analyse", "action: discard\n    pipeline: radlogics")
        .replace("    destinations: [pacs]\n", ""),
        "rules.0.pipeline: only for action analyse, not discard",
    ),
    "unknown action": (
        BASE.replace("action: analyse", "action: archive"),
        "rules.0.action: Input should be 'analyse', 'forward' or 'discard'",
    ),
    "duplicate destination names": (
        BASE.replace("rules:", "  - {name: pacs, kind: orthanc, url: http://127.0.0.1:8042}\nrules:"),
        "destinations.1.name: 'pacs' is already the name of destinations.0",
    ),
    "duplicate rule names": (
        BASE + "  - {name: chest-ct, action: discard}\n",
        "rules.1.name: 'chest-ct' is already the name of rules.0",
    ),
    "unknown destination kind": (
        BASE.replace("kind: dicom", "kind: ftp"),
        "destinations.0.kind: must be one of dicom, stow, orthanc, fhir, got 'ftp'",
    ),
    "dicom destination without port": (
        BASE.replace(" port: 4242,", ""),
        "destinations.0.port: Field required",
    ),
    "stow url scheme": (
        BASE.replace("rules:", "  - {name: web, kind: stow, url: 'ftp://host/dicom-web'}\nrules:"),
        "destinations.1.url: 'ftp://host/dicom-web' is not an http:// or https:// URL",
    ),
    "password without user": (
        BASE.replace("rules:", "  - {name: web, kind: stow, url: 'http://h/dw', password: s3cret}\nrules:"),
        "destinations.1.username: username and password go together",
    ),
    "fallback to unknown destination": (
        BASE + "routing: {mode: first, fallback: {action: forward, destinations: [nowhere]}}\n",
        "routing.fallback.destinations.0: unknown destination 'nowhere' (destinations: pacs)",
    ),
    "routing mode": (
        BASE + "routing: {mode: some}\n",
        "routing.mode: Input should be 'first' or 'all'",
    ),
    "backoff order": (
        BASE + "retry: {backoff_initial_s: 60, backoff_max_s: 10}\n",
        "retry.backoff_max_s: must be at least backoff_initial_s (60)",
    ),
    "tls without ca": (
        BASE + "tls: {cert: node.pem, key: node.key}\n",
        "tls.ca: needed to verify client certificates (or set require_client_cert: false)",
    ),
    "bad device": (
        BASE + "workers: {device: tpu}\n",
        "workers.device: 'tpu': must be auto, cpu, cuda or cuda:N",
    ),
    "yaml syntax error": (
        BASE.replace("storage: {root: ./var}", "storage: {root: ./var"),
        "yaml (line 3, column 13): expected ',' or '}', but got ':'",
    ),
    "duplicate yaml key": (
        BASE.replace("storage: {root: ./var}", "storage: {root: ./var}\nnode: {port: 104}"),
        "yaml (line 3, column 1): key 'node' given twice",
    ),
    "not a mapping": (
        "- node\n- rules\n",
        "(top level): expected a mapping of sections (node, storage, rules, ...), got list",
    ),
    "empty file": (
        "",
        "(top level): expected a mapping of sections (node, storage, rules, ...), got nothing (empty file)",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_problem_lines_name_the_field(tmp_path, name):
    text, expected = CASES[name]
    problems = _problems(tmp_path, text)
    assert expected in problems, problems


def test_base_is_valid(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.rules[0].lungs == "unet" and cfg.rules[0].pipeline == "radlogics"
    assert cfg.routing.mode == "first" and cfg.routing.fallback.action == "discard"


def test_every_wrong_field_is_reported_at_once(tmp_path):
    text = BASE.replace("port: 11112", "port: 70000").replace("ae_title: ORTHANC", "ae_title: ''")
    problems = _problems(tmp_path, text)
    assert "node.port: Input should be less than 65536" in problems
    assert "destinations.0.ae_title: an AE title must not be empty or all spaces" in problems


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert info.value.problems == [f"file: {tmp_path / 'absent.yaml'} not found"]


def test_tls_files_resolved_and_checked(tmp_path):
    (tmp_path / "certs").mkdir()
    for name in ("node.pem", "node.key"):
        (tmp_path / "certs" / name).write_text("x")
    text = BASE + "tls: {cert: certs/node.pem, key: certs/node.key, ca: certs/ca.pem}\n"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), base=tmp_path)
    assert info.value.problems == [f"tls.ca: file {tmp_path / 'certs' / 'ca.pem'} not found"]
    (tmp_path / "certs" / "ca.pem").write_text("x")
    cfg = load_config(_write(tmp_path, text), base=tmp_path)
    assert cfg.tls.cert == tmp_path / "certs" / "node.pem" and cfg.tls.require_client_cert


def test_absolute_storage_root_is_kept(tmp_path):
    cfg = load_config(_write(tmp_path, BASE.replace("root: ./var", f"root: {tmp_path / 'data'}")),
                      base=Path("/elsewhere"))
    assert cfg.storage.root == tmp_path / "data"


def test_password_not_in_repr():
    cfg = parse_config({"destinations": [{"name": "web", "kind": "stow", "url": "https://h/dw/",
                                          "username": "u", "password": "s3cret"}]})
    assert "s3cret" not in repr(cfg)
    assert cfg.destinations[0].url == "https://h/dw"  # trailing slash dropped: paths are appended


def _password_seen_by_a_spawned_child(cfg, out) -> None:
    from ct_ai_node.egress.factory import destination_from_config

    out.put(destination_from_config(cfg.destinations[0]).auth)


def test_destination_password_is_a_secret_that_workers_still_receive():
    import multiprocessing

    from ct_ai_node.egress.factory import destination_from_config

    cfg = parse_config({"destinations": [{"name": "web", "kind": "stow", "url": "https://h/dw",
                                          "username": "u", "password": "s3cret"}]})
    # never in a JSON dump, str or repr (the node logs and hands configs around)
    assert "s3cret" not in cfg.model_dump_json() and "s3cret" not in str(cfg) and "s3cret" not in repr(cfg)
    assert destination_from_config(cfg.destinations[0]).auth == ("u", "s3cret")
    # the node starts its workers and router with "spawn" and the config pickled: the
    # secret arrives (a JSON hand-off would have given them "**********")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_password_seen_by_a_spawned_child, args=(cfg, out))
    child.start()
    try:
        assert out.get(timeout=60) == ("u", "s3cret")
    finally:
        child.join(timeout=30)


def test_config_is_immutable():
    cfg = default_config()
    with pytest.raises(Exception):
        cfg.node.port = 104  # type: ignore[misc]


def test_analyze_spelling_accepted():
    cfg = parse_config({"rules": [{"name": "r", "action": "analyze"}]})
    assert cfg.rules[0].action == "analyse" and cfg.rules[0].pipeline == "radlogics"


# -- default_config -------------------------------------------------------------

def test_default_config():
    cfg = default_config()
    assert isinstance(cfg, NodeConfig)
    assert (cfg.node.ae_title, cfg.node.port) == ("CTAI", 11112)
    assert cfg.allowed_callers == [] and cfg.caller_allowed("ANYONE", "10.1.2.3")
    assert cfg.destinations == []
    (rule,) = cfg.rules
    assert rule.action == "analyse" and rule.pipeline == "radlogics" and rule.destinations == []
    assert rule.when[0].test == ("equals", "CT")


def test_default_config_with_destinations_sends_there(tmp_path):
    cfg = default_config(
        destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": 4242, "ae_title": "PACS"}],
        storage={"root": str(tmp_path)},
    )
    assert cfg.rules[0].destinations == ["pacs"]
    assert cfg.storage.root == tmp_path


def test_default_config_override_errors_name_the_field():
    with pytest.raises(ConfigError) as info:
        default_config(node={"port": 70000})
    assert info.value.problems == ["node.port: Input should be less than 65536"]
    with pytest.raises(ConfigError) as info:
        default_config(nodes={})
    assert info.value.problems == ["nodes: unknown field"]


def test_resolved_makes_paths_absolute(tmp_path):
    cfg = default_config().resolved(tmp_path)
    assert cfg.storage.root == tmp_path / "var"
    assert cfg.storage.db_path.is_absolute()


# -- command line ---------------------------------------------------------------

def test_check_config_ok():
    res = CliRunner().invoke(app, ["check-config", str(EXAMPLE)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "OK: AE title CTAI, port 11112, 1 destination, 1 rule"


def test_check_config_problems_exit_2(tmp_path):
    path = _write(tmp_path, BASE.replace("port: 4242", "port: 70000")
                  + "logging: {level: debug}\n")
    res = CliRunner().invoke(app, ["check-config", str(path)])
    assert res.exit_code == EXIT_REJECTED
    assert res.stderr.splitlines() == [
        "destinations.0.port: Input should be less than 65536",
        "logging: unknown field",
    ]
    assert "OK" not in res.stdout and "Traceback" not in res.output


def test_check_config_missing_file(tmp_path):
    res = CliRunner().invoke(app, ["check-config", str(tmp_path / "nope.yaml")])
    assert res.exit_code == EXIT_REJECTED
    assert res.stderr.strip() == f"file: {tmp_path / 'nope.yaml'} not found"


RULES = """\
node: {ae_title: CTAI, port: 11112}
destinations:
  - {name: pacs, kind: dicom, host: 127.0.0.1, port: 4242, ae_title: ORTHANC}
routing: {mode: first, fallback: {action: discard}}
rules:
  - name: chest-ct
    when:
      - {tag: Modality, equals: CT}
      - {tag: SeriesDescription, regex: "(?i)thorax|chest"}
      - {tag: SliceThickness, range: [0.5, 5]}
      - {calling_ae: {in: [PACS]}}
      - {instances: {range: [20, 2000]}}
      - {image_type: {contains: AXIAL}}
      - {orientation: {equals: axial}}
    action: analyse
    destinations: [pacs]
"""


def test_rules_test_on_a_folder(tmp_path):
    folder = tmp_path / "study"
    write_ct_series(folder / "ct", n=24, series_number=2, description="Thorax 2.5 B40f")
    write_ct_series(folder / "mr", n=24, series_number=5, modality="MR", sop_class=MR_IMAGE_STORAGE,
                    description="t1_vibe_tra", image_type=("ORIGINAL", "PRIMARY", "M", "ND"))
    (folder / "notes.txt").write_text("not an image")
    config = _write(tmp_path, RULES)
    res = CliRunner().invoke(app, ["rules", "test", str(folder), "--config", str(config), "--calling-ae", "PACS"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    ct = lines.index("series 2 (Thorax 2.5 B40f): 24 instances, axial")
    mr = lines.index("series 5 (t1_vibe_tra): 24 instances, axial")
    assert ct < mr
    assert lines[ct + 1: ct + 11] == [
        "  => chest-ct: analyse (pipeline radlogics, lungs unet) -> pacs",
        "  rule chest-ct: matched -> analyse (pipeline radlogics, lungs unet) -> pacs",
        '    Modality "CT" equals "CT": yes',
        '    SeriesDescription "Thorax 2.5 B40f" matches regex "(?i)thorax|chest": yes',
        "    SliceThickness 2.5 in range [0.5, 5]: yes",
        '    calling_ae "PACS" in ["PACS"]: yes',
        "    instances 24 in range [20, 2000]: yes",
        '    image_type "ORIGINAL\\PRIMARY\\AXIAL" contains "AXIAL": yes',
        '    orientation "axial" equals "axial": yes',
        "series 5 (t1_vibe_tra): 24 instances, axial",
    ]
    assert lines[mr + 1: mr + 5] == [
        "  => fallback: discard",
        "  rule chest-ct: not matched (3 of 7 conditions false)",
        '    Modality "MR" equals "CT": no',
        '    SeriesDescription "t1_vibe_tra" matches regex "(?i)thorax|chest": no',
    ]
    assert '    image_type "ORIGINAL\\PRIMARY\\M\\ND" contains "AXIAL": no' in lines
    assert "  no rule matched: fallback -> discard" in lines
    assert lines[-1] == "1 file(s) skipped (not DICOM, or damaged)"
    # patient data never shows: the header has a PatientName, the output does not
    assert "Test^Patient" not in res.output


def test_rules_test_other_caller_falls_back(tmp_path):
    write_ct_series(tmp_path / "ct", n=24)
    config = _write(tmp_path, RULES)
    res = CliRunner().invoke(app, ["rules", "test", str(tmp_path / "ct"), "--config", str(config),
                                   "--calling-ae", "MODALITY1", "--called-ae", "OTHER"])
    assert res.exit_code == 0, res.output
    assert '    calling_ae "MODALITY1" in ["PACS"]: no' in res.stdout.splitlines()
    assert "  => fallback: discard" in res.stdout.splitlines()


def test_rules_test_bad_config_and_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    good = _write(tmp_path, RULES)
    res = CliRunner().invoke(app, ["rules", "test", str(tmp_path / "empty"), "--config", str(good)])
    assert res.exit_code == EXIT_REJECTED and res.stderr.strip() == "no DICOM series among 0 files"
    bad = tmp_path / "bad.yaml"
    bad.write_text(RULES.replace("port: 4242", "port: 70000"))
    res = CliRunner().invoke(app, ["rules", "test", str(tmp_path / "empty"), "--config", str(bad)])
    assert res.exit_code == EXIT_REJECTED
    assert res.stderr.splitlines() == ["destinations.0.port: Input should be less than 65536"]


def test_config_commands_do_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom ct_ai_node.cli import app\n"
            f"r = CliRunner().invoke(app, ['check-config', {str(EXAMPLE)!r}])\n"
            "assert r.exit_code == 0, r.output\nprint('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dump_and_reload_round_trip():
    # a config survives JSON (job payloads, `serve` handing it to worker processes)
    cfg = load_config(EXAMPLE)
    assert parse_config(cfg.model_dump(mode="json", by_alias=True)) == cfg
    assert default_config(destinations=cfg.destinations, rules=cfg.rules).rules == cfg.rules


def test_environment_values_in_the_restart_sections_only(tmp_path, monkeypatch):
    """``${NAME}`` takes secrets and per-host values from the environment (containers), in
    the sections the web app never edits; an unset variable is named with its field; in an
    editable section the text stays as written."""
    from ct_ai_node.config import ConfigError, load_config

    path = tmp_path / "node.yaml"
    path.write_text("queue: {kind: postgres, url: '${CTAI_DB_URL}'}\n"
                    "workers: {count: 1, fetch_from: 'http://ingress:8080', fetch_token: '${CTAI_TOKEN}'}\n"
                    "destinations: [{name: pacs, kind: orthanc, url: 'http://orthanc:8042', username: ctai, password: '${NOT_THIS}'}]\n")
    monkeypatch.delenv("CTAI_TOKEN", raising=False)
    monkeypatch.setenv("CTAI_DB_URL", "postgresql://ctai@db:5432/ctai")
    with pytest.raises(ConfigError) as missing:
        load_config(path)
    assert missing.value.problems == ["workers.fetch_token: environment variable CTAI_TOKEN is not set"]
    monkeypatch.setenv("CTAI_TOKEN", "ctai_secret")
    config = load_config(path)
    assert config.queue.url.get_secret_value() == "postgresql://ctai@db:5432/ctai"
    assert config.workers.fetch_token.get_secret_value() == "ctai_secret"
    assert config.destinations[0].password.get_secret_value() == "${NOT_THIS}"
