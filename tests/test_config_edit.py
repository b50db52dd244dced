"""Editing the configuration from the web app: the pure section editing (masked secrets,
check-config's messages, change summaries) and the file store (atomic, comments kept)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ct_ai_node.config import ConfigError, load_config
from ct_ai_node.config_edit import MASK, describe_change, parse_section, restart_needed, section_text, with_section
from ct_ai_node.node.config_store import ConfigStore

FILE = """\
# the site's node (comment at the top)
node:
  ae_title: CTAI   # registered in the PACS
  port: 11112
storage: {root: ./var, min_free_mb: 10}
destinations:
  - {name: pacs, kind: dicom, host: 127.0.0.1, port: 4242, ae_title: PACS}
  - {name: web, kind: stow, url: "http://127.0.0.1:8042/dicom-web", username: ctai, password: s3cret-Pw}
rules:
  - name: chest-ct
    when: [{tag: Modality, equals: CT}]
    action: analyse
    destinations: [pacs]
# the web app (comment below the rules)
web: {host: 127.0.0.1, port: 8080}
"""


def _data() -> dict:
    return yaml.safe_load(FILE)


def test_section_text_masks_passwords_and_a_mask_keeps_the_saved_one():
    text = section_text(_data(), "destinations")
    assert "s3cret-Pw" not in text and MASK in text
    value = parse_section(text + "- {name: archive, kind: dicom, host: 127.0.0.1, port: 104, ae_title: ARCH}\n",
                          "destinations")
    data = with_section(_data(), "destinations", value)
    assert data["destinations"][1]["password"] == "s3cret-Pw"
    assert [d["name"] for d in data["destinations"]] == ["pacs", "web", "archive"]
    # a masked password for a destination that had none is an error naming the field
    value[2]["password"], value[2]["username"] = MASK, "x"
    with pytest.raises(ConfigError) as err:
        with_section(_data(), "destinations", value)
    assert err.value.problems == ["destinations.2.password: type the password (no saved one for 'archive')"]
    assert section_text({}, "allowed_callers") == ""
    assert parse_section("", "rules") == [] and parse_section("  \n", "routing") == {}
    with pytest.raises(ConfigError, match="not an editable section"):
        section_text(_data(), "storage")
    with pytest.raises(ConfigError, match="rules: "):
        parse_section("- name: [unclosed\n", "rules")


def test_change_summaries_name_entries_never_secrets():
    old = _data()["destinations"]
    new = [dict(old[0], port=4243), dict(old[1], password="other"), {"name": "archive"}]
    line = describe_change("destinations", old, new)
    assert line == "destinations: added archive; changed pacs, web"
    assert "other" not in line and "s3cret" not in line
    assert describe_change("rules", [{"name": "a"}, {"name": "b"}], [{"name": "b"}, {"name": "a"}]) == \
        "rules: new order b, a"
    assert describe_change("allowed_callers", [], [{"ae_title": "PACS", "host": "10.0.0.5"}]) == \
        "allowed_callers: anyone -> PACS@10.0.0.5"


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(FILE)
    path.chmod(0o640)
    applied = []
    current = load_config(path, base=tmp_path)
    return ConfigStore(path, tmp_path, current, applied.append), applied


def test_store_saves_atomically_keeps_comments_and_applies(store):
    store, applied = store
    rules = store.section_text("rules")
    rules += ("- name: mr-forward\n  when: [{tag: Modality, equals: MR}]\n  action: forward\n"
              "  destinations: [web]\n")
    config, summary = store.save("rules", rules)
    assert summary == "rules: added mr-forward"
    assert [r.name for r in config.rules] == ["chest-ct", "mr-forward"] and applied == [config]
    text = store.path.read_text()
    for comment in ("# the site's node (comment at the top)", "# registered in the PACS",
                    "# the web app (comment below the rules)"):
        assert comment in text
    assert "s3cret-Pw" in text  # the other sections as they were, secrets included
    assert oct(store.path.stat().st_mode & 0o777) == "0o640"
    assert not list(store.path.parent.glob(".node.yaml.*"))  # no temporary file left
    assert [r.name for r in load_config(store.path, base=store.base).rules] == ["chest-ct", "mr-forward"]


def test_store_refuses_with_check_config_messages_and_keeps_restart_sections_for_later(store):
    store, applied = store
    before = store.path.read_text()
    bad = "- name: chest-ct\n  when: [{tag: Modality, equals: CT}]\n  action: analyse\n  destinations: [nowhere]\n"
    with pytest.raises(ConfigError) as err:
        store.save("rules", bad)
    assert err.value.problems == ["rules.0.destinations.0: unknown destination 'nowhere' (destinations: pacs, web)"]
    with pytest.raises(ConfigError) as err:
        store.save("destinations", "- {name: pacs, kind: dicom, host: 127.0.0.1, port: 99999, ae_title: PACS}\n")
    assert "destinations.0.port: Input should be less than 65536" in err.value.problems
    assert store.path.read_text() == before and applied == []
    assert store.pending_restart() == []
    # a section that needs a restart (the node's port) is saved, applied after a restart only
    config, summary = store.save("node", "ae_title: CTAI\nport: 11113\n")
    assert summary == "node: changed (saved; node: in force after the node's next restart)"
    assert config.node.port == 11112 and applied == [] and store.pending_restart() == ["node"]
    assert "port: 11113" in store.path.read_text()
    # then a live edit applies the live part only; the node section stays as in force
    config, summary = store.save("rules", store.section_text("rules"))
    assert summary.startswith("rules: no change") and applied == []


def test_restart_needed_names_sections(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(FILE)
    a = load_config(path, base=tmp_path)
    path.write_text(FILE.replace("min_free_mb: 10", "min_free_mb: 20").replace("port: 4242", "port: 4243"))
    b = load_config(path, base=tmp_path)
    assert restart_needed(a, b) == ["storage"]
    assert isinstance(Path(a.storage.root), Path)


def test_splice_replaces_flow_and_block_sections_and_appends_a_missing_one():
    from ct_ai_node.node.config_store import splice_section

    text = "a: 1  # one\nrules: []\n# about b\nb:\n- x\n# trailing\nc: {d: 2}"
    out = splice_section(text, "rules", [{"name": "r"}])
    assert out == "a: 1  # one\nrules:\n- name: r\n# about b\nb:\n- x\n# trailing\nc: {d: 2}\n"
    out = splice_section(out, "b", ["y", "z"])
    assert "# about b\nb:\n- y\n- z\n# trailing\nc: {d: 2}\n" in out
    out = splice_section(out, "allowed_callers", [{"ae_title": "PACS"}])
    assert out.endswith("c: {d: 2}\n\nallowed_callers:\n- ae_title: PACS\n")
    assert yaml.safe_load(out)["allowed_callers"] == [{"ae_title": "PACS"}]
