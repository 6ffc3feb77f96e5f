"""The Helm chart rendered by Helm's own engine (helm-python-sdk, a bundled Go library), parsed.

Shared by tests/unit/test_helm.py and the reliability tests that check what the chart deploys.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import helm_python as helm
import yaml
from helm_python import _native

CHART = Path(__file__).resolve().parents[1] / "helm" / "dkv"
RELEASE, NAMESPACE = "rel", "ml"
FULL = f"{RELEASE}-dkv"


def render_raw(values: dict | None = None, *, chart_dir: Path = CHART, api_versions: tuple[str, ...] = ()):
    """Template path -> rendered text. ``api_versions`` are what `helm template --api-versions` adds
    to .Capabilities; Chart.render (0.2.x) has no argument for them, the library's render options
    do, so this calls the library with the loaded chart directly."""
    opts: dict = {"name": RELEASE, "namespace": NAMESPACE}
    if api_versions:
        opts["api_versions"] = list(api_versions)
    with helm.Chart.load(chart_dir) as chart:
        raw = _native.call_string(
            "helm_render", chart._raw(), None if values is None else json.dumps(values), json.dumps(opts)
        )
    return json.loads(raw)


# yaml.safe_load_all, with libyaml's parser when PyYAML has it (same safe loader, ~10x faster).
safe_load_all = functools.partial(yaml.load_all, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def render(values: dict | None = None, **kw) -> list[dict]:
    """Every rendered Kubernetes document, parsed."""
    docs = []
    for path, text in sorted(render_raw(values, **kw).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in safe_load_all(text):
            if doc is not None:
                assert isinstance(doc, dict) and doc.get("kind") and doc.get("apiVersion"), (path, doc)
                docs.append(doc)
    return docs


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def workload(docs, component):
    kind = "StatefulSet" if component == "store" else "Deployment"
    return one(docs, kind, f"{FULL}-{component}")


def container(docs, component):
    (c,) = workload(docs, component)["spec"]["template"]["spec"]["containers"]
    return c


def env(docs, component) -> dict[str, dict]:
    entries = container(docs, component)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"{component}: duplicate env {names}"
    return {e["name"]: e for e in entries}


def env_values(docs, component) -> dict[str, str]:
    return {k: e["value"] for k, e in env(docs, component).items() if "value" in e}


def pod_env(docs, component, secrets: dict[str, str]) -> dict[str, str]:
    """The environment the component's process sees: ``secrets`` by key for secretKeyRef values
    (optional ones absent from it are left out, as Kubernetes does), the pod name for fieldRef,
    and $(NAME) expanded from the variables defined before, as Kubernetes does."""
    out = {}
    for name, entry in env(docs, component).items():
        if "valueFrom" in entry:
            source = entry["valueFrom"]
            if "fieldRef" in source:
                out[name] = {"metadata.name": f"{FULL}-{component}-0"}[source["fieldRef"]["fieldPath"]]
            elif source["secretKeyRef"]["key"] in secrets or not source["secretKeyRef"].get("optional"):
                out[name] = secrets[source["secretKeyRef"]["key"]]
        else:
            out[name] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), ""), entry["value"])
    return out
