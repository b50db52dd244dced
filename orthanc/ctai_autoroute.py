"""Orthanc Python plugin: send every stable series that qualifies to the ct-ai-node.

Install (Debian: `apt-get install orthanc-python`), then in the Orthanc configuration:

    "PythonScript": "/path/to/ctai_autoroute.py",
    "StableAge": 10,
    "DicomModalities": {"ctai": ["CTAI", "127.0.0.1", 11112]},
    "CtAiNode": {"Modality": "ctai", "Modalities": ["CT"], "MinInstances": 20}

When Orthanc declares a series stable (no new instance for StableAge seconds) and
its Modality is listed and it has at least MinInstances instances, the series is
C-STOREd to the node as an asynchronous Orthanc job (never blocking Orthanc's
change thread). The node's own results (SEG, SR, SC, KO) are never sent back:
their modalities are not in the list. The node analyses the series by its rules
and sends the results to its destinations (typically this Orthanc).
"""

import json

import orthanc

DEFAULTS = {"Modality": "ctai", "Modalities": ["CT"], "MinInstances": 20}


def _settings():
    config = json.loads(orthanc.GetConfiguration())
    settings = dict(DEFAULTS)
    settings.update(config.get("CtAiNode", {}))
    return settings


SETTINGS = _settings()


def _qualifies(series_id):
    series = json.loads(orthanc.RestApiGet("/series/%s" % series_id))
    modality = series.get("MainDicomTags", {}).get("Modality", "")
    count = len(series.get("Instances", []))
    if modality not in SETTINGS["Modalities"]:
        return False, "modality %s not routed" % (modality or "(none)")
    if count < SETTINGS["MinInstances"]:
        return False, "%d instances < %d" % (count, SETTINGS["MinInstances"])
    return True, "%s, %d instances" % (modality, count)


def on_change(change_type, level, resource_id):
    if change_type != orthanc.ChangeType.STABLE_SERIES:
        return
    try:
        ok, why = _qualifies(resource_id)
        if not ok:
            orthanc.LogInfo("ct-ai-node: series %s not sent (%s)" % (resource_id, why))
            return
        body = json.dumps({"Resources": [resource_id], "Asynchronous": True, "Priority": 0})
        job = json.loads(orthanc.RestApiPost("/modalities/%s/store" % SETTINGS["Modality"], body))
        orthanc.LogWarning("ct-ai-node: series %s (%s) sent to %s, job %s"
                           % (resource_id, why, SETTINGS["Modality"], job.get("ID")))
    except Exception as exc:  # a failure must never take Orthanc's change thread down
        orthanc.LogError("ct-ai-node: series %s not sent: %s" % (resource_id, exc))


orthanc.RegisterOnChangeCallback(on_change)
