"""The Helm chart (helm/dkv), rendered and linted by Helm's own engine.

helm-python-sdk binds Helm's Go SDK (a bundled shared library) with ctypes: no helm binary, no
cluster, no network. Every rendered document is parsed with yaml.safe_load_all and checked:
kinds, labels, probes, ports, resources, and the environment, whose ``DKV_*`` names must be
fields of the settings dataclasses in services/settings.py (so renaming a setting breaks this
test until the chart follows).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from helm_chart import (
    CHART,
    FULL,
    NAMESPACE,
    RELEASE,
    container,
    env,
    env_values,
    of_kind,
    one,
    pod_env,
    render,
    render_raw,
    workload,
)

from dkv.services import settings as S

ROOT = Path(__file__).resolve().parents[2]
SERVICE_MONITOR = "monitoring.coreos.com/v1/ServiceMonitor"

SETTINGS = {
    "store": S.StoreSettings,
    "prefill": S.PrefillSettings,
    "decode": S.DecodeSettings,
    "gateway": S.GatewaySettings,
}
COMPONENTS = tuple(SETTINGS)
# The env names dkv reads, per component, from the dataclasses themselves.
VALID_ENV = {c: {S.env_name(cls, f.name) for f in dataclasses.fields(cls)} for c, cls in SETTINGS.items()}
# DKV_* variables the chart sets that are not settings fields, with the file that reads each.
NOT_SETTINGS = {"DKV_MODEL_CACHE": ROOT / "workers" / "model.py"}
PORTS = {"store": 50052, "prefill": 50053, "decode": 50054, "gateway": 50051}
# Addresses the chart derives from the Services (unless overridden).
WIRING = {
    "DKV_PREFILL_STORE",
    "DKV_DECODE_STORE",
    "DKV_DECODE_PREFILL",
    "DKV_GATEWAY_PREFILL",
    "DKV_GATEWAY_DECODE",
    "DKV_GATEWAY_STORE",
}
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)

EVERYTHING_ON = {
    "store": {"shards": 3},
    "decode": {"gpus": 1},
    "redis": {"enabled": False},
    "externalRedis": {"url": "redis://redis.example:6379/0", "existingSecret": "redis-pw", "passwordKey": "password"},
    "auth": {"existingSecret": "dkv-auth", "tokenKey": "token", "tenantTokensKey": "tenants"},
    "tls": {"enabled": True, "existingSecret": "dkv-tls", "mutual": True},
    "networkPolicy": {"enabled": False},
}


@pytest.fixture(scope="module")
def default_docs():
    return render()


@pytest.fixture(scope="module")
def everything_docs():
    return render(EVERYTHING_ON)


def env_str(value) -> str:
    """A value as the chart writes it into an env var (whole floats without '.0')."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- values.yaml, read with its comments ------------------------------------------------------------

_KEY = re.compile(r"^(\s*)([A-Za-z][A-Za-z0-9_]*):(.*)$")


def values_entries() -> list[tuple[tuple[str, ...], str, bool]]:
    """(key path, the comment block right above the key, whether it is a leaf) for every key."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    entries, stack, comment = [], [], []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        m = _KEY.match(line)
        if not m:  # a blank line or a list item ends a comment block
            comment = []
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        entries.append([tuple(k for _, k in stack), " ".join(comment), indent, m.group(3).strip()])
        comment = []
    out = []
    for i, (path, text, indent, rest) in enumerate(entries):
        nxt = entries[i + 1][2] if i + 1 < len(entries) else -1
        out.append((path, text, bool(rest) or nxt <= indent))
    return out


def dkv_mappings() -> dict[tuple[str, ...], list[str]]:
    """Key path -> the DKV_* names its comment maps it to (DKV_<C>_X expanded to every component)."""
    out = {}
    for path, text, _ in values_entries():
        names = re.findall(r"->\s*(DKV_[A-Z<>_]+)", text)
        if names:
            out[path] = names
    return out


def get_path(d: dict, path):
    for k in path:
        d = d[k]
    return d


def with_path(path, value) -> dict:
    out: dict = {}
    cur = out
    for k in path[:-1]:
        cur = cur.setdefault(k, {})
    cur[path[-1]] = value
    return out


# --- the chart and its values ------------------------------------------------------------------------


def test_chart_metadata():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (meta["apiVersion"], meta["name"], meta["version"], str(meta["appVersion"])) == (
        "v2",
        "dkv",
        "0.1.0",
        "0.1.0",
    )
    with helm.Chart.load(CHART) as chart:
        assert chart.name == "dkv" and chart.version == "0.1.0"
        assert chart.schema is not None and chart.schema["$schema"].endswith("draft-07/schema#")
        chart.validate_schema(chart.values)  # the defaults satisfy their own schema


@pytest.mark.parametrize("values", [None, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_lint_is_clean(values):
    report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
    assert report["errors"] == [], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def test_every_value_is_documented():
    undocumented = []
    entries = values_entries()
    comments = {path: text for path, text, _ in entries}
    for path, _, leaf in entries:
        if leaf and not any(comments.get(path[:i]) for i in range(1, len(path) + 1)):
            undocumented.append(".".join(path))
    assert not undocumented, f"values without a comment: {undocumented}"


def test_value_comments_name_real_settings_one_each():
    mappings = dkv_mappings()
    assert len(mappings) > 40
    for path, names in mappings.items():
        assert len(set(names)) == 1, f"{'.'.join(path)} maps to several settings: {names}"
        (name,) = set(names)
        if "<C>" in name:
            for c in COMPONENTS:
                assert name.replace("<C>", c.upper()) in VALID_ENV[c], (path, name)
        else:
            component = name.split("_")[1].lower()
            assert name in VALID_ENV[component], f"{'.'.join(path)} -> {name}: no such setting"
            if path[0] in SETTINGS:
                assert component == path[0], (path, name)


def _sentinel(chart, path, default):
    """A value for ``path`` other than its default that the schema accepts."""
    if isinstance(default, (int, float)):
        candidates = [default + 1, default / 2 or 0.5, 0.5, 7]
    else:
        candidates = ["7MiB", "3GiB", "debug", "text", "lru", "int8", "cpu", "tinyllama", "bfloat16"]
    for value in candidates:
        if value == default:
            continue
        try:
            chart.validate_schema(with_path(path, value))
        except helm.HelmValuesError:
            continue
        return value
    raise AssertionError(f"no sentinel for {path}")


def _merge(into: dict, more: dict) -> dict:
    for k, v in more.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = v
    return into


def test_each_mapped_value_sets_its_env_var(default_docs):
    """The default of every mapped scalar value is what its env var holds, and changing the values
    (all at once, each to its own new value) changes exactly those env vars: the comments tell the
    truth and no two values feed one variable."""
    mapped, overrides = {}, {}
    with helm.Chart.load(CHART) as chart:
        defaults = chart.values
        for path, names in dkv_mappings().items():
            name = names[0]
            if "<C>" in name:
                continue  # auth / tls: tested below with the Secrets
            default = get_path(defaults, path)
            if isinstance(default, bool) or default in ("", []):
                continue  # derived values (an address, a URL): tested in the wiring tests
            component = name.split("_")[1].lower()
            assert env_values(default_docs, component)[name] == env_str(default), path
            value = _sentinel(chart, path, default)
            mapped[name] = (component, path, value)
            _merge(overrides, with_path(path, value))
    assert len(mapped) >= 35
    models = {overrides[c].get("model") for c in ("prefill", "decode", "gateway")}
    assert len(models) == 1  # the three models must agree, and do with one sentinel
    changed = render(overrides)
    for name, (component, path, value) in mapped.items():
        assert env_values(changed, component)[name] == env_str(value), path
    for component in COMPONENTS:
        before, after = env_values(default_docs, component), env_values(changed, component)
        moved = {n for n in before if before[n] != after.get(n)}
        assert moved - WIRING == {n for n, (c, _, _) in mapped.items() if c == component}, component
    # the ports also move the addresses the components reach each other at
    assert env_values(changed, "decode")["DKV_DECODE_STORE"] == f"{FULL}-store:{overrides['store']['port']}"
    assert env_values(changed, "gateway")["DKV_GATEWAY_DECODE"] == f"dns:///{FULL}-decode:{overrides['decode']['port']}"


# --- what renders -------------------------------------------------------------------------------------


def test_default_render_kinds_and_names(default_docs):
    kinds = sorted({d["kind"] for d in default_docs})
    assert kinds == sorted(
        {
            "StatefulSet",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "ConfigMap",
            "ServiceAccount",
            "Secret",
        }
    )
    assert [d["metadata"]["name"] for d in of_kind(default_docs, "StatefulSet")] == [f"{FULL}-store"]
    assert sorted(d["metadata"]["name"] for d in of_kind(default_docs, "Deployment")) == [
        f"{FULL}-{c}" for c in ("decode", "gateway", "prefill", "redis")
    ]
    assert sorted(d["metadata"]["name"] for d in of_kind(default_docs, "Service")) == sorted(
        [f"{FULL}-{c}" for c in ("store", "prefill", "decode", "gateway", "redis")] + [f"{FULL}-store-headless"]
    )
    assert sorted(d["metadata"]["name"] for d in of_kind(default_docs, "PodDisruptionBudget")) == sorted(
        f"{FULL}-{c}" for c in (*COMPONENTS, "redis")
    )
    assert sorted(d["metadata"]["name"] for d in of_kind(default_docs, "Secret")) == [f"{FULL}-auth", f"{FULL}-redis"]
    for d in default_docs:
        assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]
    assert not of_kind(default_docs, "ServiceMonitor")


def test_labels_and_selectors(default_docs):
    for d in default_docs:
        labels = d["metadata"]["labels"]
        for key in STANDARD_LABELS:
            assert labels.get(key), f"{d['kind']} {d['metadata']['name']} lacks {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "dkv-0.1.0"
    pods = {}
    for w in of_kind(default_docs, "Deployment") + of_kind(default_docs, "StatefulSet"):
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        selector = w["spec"]["selector"]["matchLabels"]
        # stable selectors: no version or chart label (they change on upgrade, selectors cannot)
        assert selector == {
            "app.kubernetes.io/name": "dkv",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": component,
        }
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        pods[component] = pod_labels
    for svc in of_kind(default_docs, "Service"):
        assert any(svc["spec"]["selector"].items() <= p.items() for p in pods.values()), svc["metadata"]["name"]
    for pdb in of_kind(default_docs, "PodDisruptionBudget"):
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= p.items() for p in pods.values())


@pytest.mark.parametrize("component", COMPONENTS)
def test_commands_ports_and_grpc_probes(default_docs, component):
    c = container(default_docs, component)
    assert c["image"] == "dkv:0.1.0"
    assert c["command"] + c["args"] == ["dkv", component, "serve"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    http = {"http": 8000} if component == "gateway" else {}  # the OpenAI-compatible API
    assert ports == {"grpc": PORTS[component], **http, "metrics": 9400}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"] == {"port": PORTS[component], "service": ""}, probe
        assert "tcpSocket" not in c[probe] and "exec" not in c[probe]
    start = c["startupProbe"]
    budget = start["periodSeconds"] * start["failureThreshold"]
    assert budget >= (60 if component == "store" else 300), f"{component} startup budget {budget}s"
    values = env_values(default_docs, component)
    prefix = f"DKV_{component.upper()}_"
    assert values[prefix + "HOST"] == "0.0.0.0"
    assert values[prefix + "PORT"] == str(PORTS[component])
    assert values[prefix + "METRICS_PORT"] == "9400"
    svc = one(default_docs, "Service", f"{FULL}-{component}")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "grpc": (PORTS[component], "grpc"),
        **{name: (port, name) for name, port in http.items()},
        "metrics": (9400, "metrics"),
    }
    assert svc["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("component", COMPONENTS)
def test_security_context_and_graceful_shutdown(default_docs, component):
    pod = workload(default_docs, component)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    values = env_values(default_docs, component)
    prefix = f"DKV_{component.upper()}_"
    drain_and_grace = float(values[prefix + "DRAIN_DELAY_S"]) + float(values[prefix + "GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > drain_and_grace


def test_termination_grace_set_too_short_fails():
    assert (
        workload(render({"decode": {"terminationGracePeriodSeconds": 90}}), "decode")["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        == 90
    )
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render({"decode": {"terminationGracePeriodSeconds": 30}})  # 30 <= drain 5 + grace 30


@pytest.mark.parametrize(
    "values",
    [None, EVERYTHING_ON, {"decode": {"recompute": False}, "store": {"redisTier": False}}],
    ids=["defaults", "everything-on", "no-recompute-no-redis"],
)
def test_every_dkv_env_var_is_a_setting(values):
    docs = render(values)
    for component in COMPONENTS:
        for name in env(docs, component):
            if not name.startswith("DKV_"):
                continue
            assert name in VALID_ENV[component] or name in NOT_SETTINGS, (
                f"{component} sets {name}, which is no field of {SETTINGS[component].__name__}"
            )
    for name, reader in NOT_SETTINGS.items():
        assert name in reader.read_text(), f"{name} is no longer read by {reader}"


def test_the_chart_sets_every_setting(everything_docs):
    """With auth and TLS on, each component gets every field of its settings: a new setting needs a
    value in the chart (or an explicit decision here)."""
    for component in COMPONENTS:
        set_names = {n for n in env(everything_docs, component) if n.startswith("DKV_")} - set(NOT_SETTINGS)
        missing = VALID_ENV[component] - set_names
        assert not missing, f"the chart does not set {sorted(missing)} for the {component}"


@pytest.mark.parametrize(
    "values",
    [
        None,
        {**EVERYTHING_ON, "tls": {"enabled": False}},
        {"store": {"deviceBytes": 4 << 30, "cpuKeepFraction": 0.25, "graceS": 2.5}},
    ],
    ids=["defaults", "auth-external-redis", "numbers"],
)
def test_rendered_env_loads_into_the_settings(values):
    """What the chart renders is what dkv accepts: each container's env, given to settings.load
    as the process would see it (Secrets filled in), builds that component's settings."""
    secrets = {
        "token": "service-token",
        "tenants": "acme=acme-token",
        "password": "pw",
        "cluster-secret": "cluster-secret-value",
        "redis-password": "redis-pw",
    }
    docs = render(values)
    for component, cls in SETTINGS.items():
        process_env = pod_env(docs, component, secrets)
        loaded = S.load(cls, {}, env=process_env)
        assert loaded.host == "0.0.0.0" and loaded.port == PORTS[component]
        if component == "store":
            assert loaded.cpu_bytes == S.parse_size(process_env["DKV_STORE_CPU_BYTES"])
            assert loaded.redis_prefix == f"dkv:{FULL}-store-0:"  # each shard its own keys in Redis
            if values and "deviceBytes" in values.get("store", {}):
                assert (loaded.device_bytes, loaded.cpu_keep_fraction, loaded.grace_s) == (4 << 30, 0.25, 2.5)


def test_wiring_through_service_dns(default_docs):
    assert env_values(default_docs, "prefill")["DKV_PREFILL_STORE"] == f"{FULL}-store:50052"
    decode = env_values(default_docs, "decode")
    assert decode["DKV_DECODE_STORE"] == f"{FULL}-store:50052"
    assert decode["DKV_DECODE_PREFILL"] == f"dns:///{FULL}-prefill:50053"
    gateway = env_values(default_docs, "gateway")
    assert gateway["DKV_GATEWAY_PREFILL"] == f"dns:///{FULL}-prefill:50053"
    assert gateway["DKV_GATEWAY_DECODE"] == f"dns:///{FULL}-decode:50054"
    for address in (decode["DKV_DECODE_STORE"], decode["DKV_DECODE_PREFILL"], gateway["DKV_GATEWAY_DECODE"]):
        host, port = address.removeprefix("dns:///").split(":")
        svc = one(default_docs, "Service", host)
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}


def test_worker_services_are_headless_so_clients_balance_calls(default_docs):
    """A ClusterIP Service balances connections, and a gRPC channel keeps one: every call of a
    gateway would go to one decode pod. Headless worker Services resolve to every ready pod."""
    for component in ("prefill", "decode"):
        assert one(default_docs, "Service", f"{FULL}-{component}")["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in one(default_docs, "Service", f"{FULL}-gateway")["spec"]
    assert "clusterIP" not in one(default_docs, "Service", f"{FULL}-store")["spec"]  # shards are separate caches
    store = env_values(default_docs, "store")
    assert store["DKV_STORE_REDIS_URL"] == f"redis://:$(REDIS_PASSWORD)@{FULL}-redis:6379/0"
    assert one(default_docs, "Service", f"{FULL}-redis")["spec"]["ports"][0]["port"] == 6379


def test_address_overrides():
    docs = render(
        {
            "gateway": {
                "decodeAddresses": ["d1.example:50054", "d2.example:50054"],
                "prefillAddress": "p.example:7000",
            },
            "decode": {"recompute": False, "storeAddress": "s.example:1"},
            "prefill": {"storeAddress": "s.example:1"},
        }
    )
    gateway = env_values(docs, "gateway")
    assert gateway["DKV_GATEWAY_DECODE"] == "d1.example:50054,d2.example:50054"
    assert gateway["DKV_GATEWAY_PREFILL"] == "p.example:7000"
    decode = env_values(docs, "decode")
    assert decode["DKV_DECODE_PREFILL"] == ""  # a missing entry is NOT_FOUND, no recompute
    assert decode["DKV_DECODE_STORE"] == env_values(docs, "prefill")["DKV_PREFILL_STORE"] == "s.example:1"


def test_store_shards_and_headless_service():
    docs = render({"store": {"shards": 3, "cpuBytes": "8GiB", "deviceBytes": 4 << 30}})
    sts = workload(docs, "store")
    assert sts["spec"]["replicas"] == 3
    headless = one(docs, "Service", f"{FULL}-store-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]  # no metrics: scraped once
    store = env_values(docs, "store")
    assert store["DKV_STORE_CPU_BYTES"] == "8GiB"
    assert store["DKV_STORE_DEVICE_BYTES"] == str(4 << 30)  # not 4.294967296e+09
    assert S.parse_size(store["DKV_STORE_DEVICE_BYTES"]) == 4 << 30
    # the workers and the gateway find the shards through the headless Service's DNS, looked up again
    # as pods come and go (ShardedStoreClient places entries on them)
    shards = f"dns:///{FULL}-store-headless:50052"
    assert env_values(docs, "prefill")["DKV_PREFILL_STORE"] == env_values(docs, "decode")["DKV_DECODE_STORE"] == shards
    assert env_values(docs, "gateway")["DKV_GATEWAY_STORE"] == shards
    assert S.load(S.PrefillSettings, {}, env={"DKV_PREFILL_STORE": shards}).store == shards
    # entries under one namespace every shard reads, each shard's bookkeeping under its own prefix
    assert store["DKV_STORE_REDIS_NAMESPACE"] == "dkv:" and store["DKV_STORE_REDIS_PREFIX"] == "dkv:$(POD_NAME):"
    assert store["DKV_STORE_REDIS_CLUSTER"] == "false"


def test_resources_and_gpu_limits(everything_docs, default_docs):
    for component in COMPONENTS:
        limits = container(default_docs, component)["resources"]["limits"]
        assert "nvidia.com/gpu" not in limits
    res = container(everything_docs, "decode")["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1
    assert res["limits"]["memory"] == "4Gi" and res["requests"]["cpu"] == "1"
    for component in ("store", "prefill", "gateway"):
        assert "nvidia.com/gpu" not in container(everything_docs, component)["resources"]["limits"]
    docs = render(
        {
            "prefill": {
                "gpus": 2,
                "resources": {"requests": {"cpu": "4"}},
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        }
    )
    pod = workload(docs, "prefill")["spec"]["template"]["spec"]
    # values merge: the default memory stays, the GPU joins the limits
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "4", "memory": "2Gi"},
        "limits": {"memory": "4Gi", "nvidia.com/gpu": 2},
    }
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_a_worker_with_gpus_runs_its_model_on_cuda(default_docs, everything_docs):
    for component in ("prefill", "decode"):
        assert env_values(default_docs, component)[f"DKV_{component.upper()}_DEVICE"] == "cpu"
        assert env_values(default_docs, component)[f"DKV_{component.upper()}_DTYPE"] == "auto"
    assert env_values(everything_docs, "decode")["DKV_DECODE_DEVICE"] == "cuda"  # decode.gpus: 1
    assert env_values(everything_docs, "prefill")["DKV_PREFILL_DEVICE"] == "cpu"
    docs = render({"prefill": {"gpus": 2, "device": "cuda:1", "dtype": "float16"}, "decode": {"device": "auto"}})
    assert env_values(docs, "prefill")["DKV_PREFILL_DEVICE"] == "cuda:1"
    assert env_values(docs, "prefill")["DKV_PREFILL_DTYPE"] == "float16"
    assert env_values(docs, "decode")["DKV_DECODE_DEVICE"] == "auto"
    with helm.Chart.load(CHART) as chart:
        for bad in ({"prefill": {"device": "tpu"}}, {"decode": {"dtype": "float64"}}):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


def test_redis_in_chart(default_docs):
    redis = one(default_docs, "Deployment", f"{FULL}-redis")
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "redis:7"
    args = c["args"]
    assert args[args.index("--maxmemory") + 1] == "3gb"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--save") + 1] == ""  # no RDB snapshots
    assert args[args.index("--appendonly") + 1] == "no"
    custom = one(render({"redis": {"maxmemory": "10gb"}}), "Deployment", f"{FULL}-redis")
    assert "10gb" in custom["spec"]["template"]["spec"]["containers"][0]["args"]


def secret_data(docs, name) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in one(docs, "Secret", name)["data"].items()}


def test_auth_is_on_by_default_with_a_generated_token_and_cluster_secret(default_docs):
    data = secret_data(default_docs, f"{FULL}-auth")
    assert set(data) == {"token", "cluster-secret"}
    assert len(data["token"]) == 48 and data["token"].isalnum() and len(data["cluster-secret"]) == 64
    for component in COMPONENTS:
        assert env(default_docs, component)[f"DKV_{component.upper()}_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{FULL}-auth",
            "key": "token",
        }
    assert env(default_docs, "store")["DKV_STORE_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULL}-auth",
        "key": "cluster-secret",
        "optional": True,
    }
    notes = render_raw()["dkv/templates/NOTES.txt"]
    assert f"get secret {FULL}-auth -o jsonpath='{{.data.token}}' | base64 -d" in notes
    assert "generated by this chart" in notes and "TLS is off" in notes and "signed with the cluster secret" in notes
    # another render (a fresh install: no Secret to look up) draws other values
    assert secret_data(render(), f"{FULL}-auth")["token"] != data["token"]


def test_auth_off_or_from_an_existing_secret():
    docs = render({"auth": {"enabled": False}})
    for component in COMPONENTS:
        assert f"DKV_{component.upper()}_AUTH_TOKEN" not in env(docs, component)
    assert (
        "No authentication (auth.enabled is false)"
        in render_raw({"auth": {"enabled": False}})["dkv/templates/NOTES.txt"]
    )
    assert env(docs, "store")["DKV_STORE_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == f"{FULL}-auth"
    docs = render({"auth": {"existingSecret": "mine", "clusterSecretKey": ""}})
    assert not [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == f"{FULL}-auth"]
    assert env(docs, "gateway")["DKV_GATEWAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "mine",
        "key": "token",
    }
    assert "DKV_STORE_CLUSTER_SECRET" not in env(docs, "store")


def test_in_chart_redis_requires_a_password_from_a_secret(default_docs):
    password = secret_data(default_docs, f"{FULL}-redis")
    assert set(password) == {"redis-password"} and password["redis-password"].isalnum()
    (c,) = one(default_docs, "Deployment", f"{FULL}-redis")["spec"]["template"]["spec"]["containers"]
    ref = {"name": f"{FULL}-redis", "key": "redis-password"}
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]} == {
        "REDIS_PASSWORD": ref,
        "REDISCLI_AUTH": ref,
    }
    assert c["args"][c["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert c["readinessProbe"]["exec"]["command"][0] == "redis-cli"  # authenticates with REDISCLI_AUTH
    store = container(default_docs, "store")["env"]
    names = [e["name"] for e in store]
    assert names.index("REDIS_PASSWORD") < names.index("DKV_STORE_REDIS_URL")
    assert store[names.index("REDIS_PASSWORD")]["valueFrom"]["secretKeyRef"] == ref
    pdb = one(default_docs, "PodDisruptionBudget", f"{FULL}-redis")
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    docs = render(
        {
            "redis": {
                "existingSecret": "redis-own",
                "passwordKey": "pw",
                "maxmemoryPolicy": "noeviction",
                "pdb": {"minAvailable": 1},
            }
        }
    )
    assert not of_kind(docs, "Secret") or all(s["metadata"]["name"] != f"{FULL}-redis" for s in of_kind(docs, "Secret"))
    assert env(docs, "store")["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-own", "key": "pw"}
    args = one(docs, "Deployment", f"{FULL}-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert one(docs, "PodDisruptionBudget", f"{FULL}-redis")["spec"]["minAvailable"] == 1


@pytest.mark.parametrize("component", COMPONENTS)
def test_tmp_has_a_size_limit(default_docs, component):
    volumes = {v["name"]: v for v in workload(default_docs, component)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "1Gi"}
    volumes = {
        v["name"]: v for v in workload(render({"tmpSizeLimit": ""}), component)["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["tmp"]["emptyDir"] == {}


def test_the_store_s_memory_budget_fits_its_pod(default_docs):
    """Host tier + Puts being received + ~0.5 GiB of process within the memory limit, and the largest
    entry can be received at all (the store refuses settings where it could not)."""
    store = env_values(default_docs, "store")
    limit = S.parse_size(container(default_docs, "store")["resources"]["limits"]["memory"])
    cpu, in_flight = S.parse_size(store["DKV_STORE_CPU_BYTES"]), S.parse_size(store["DKV_STORE_PUT_BYTES_IN_FLIGHT"])
    assert cpu + in_flight + (512 << 20) <= limit
    assert S.parse_size(store["DKV_STORE_MAX_ENTRY_BYTES"]) <= in_flight


def test_external_redis_with_password(everything_docs):
    assert not [d for d in everything_docs if d["metadata"]["name"] == f"{FULL}-redis"]
    entries = container(everything_docs, "store")["env"]
    names = [e["name"] for e in entries]
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    assert names.index("REDIS_PASSWORD") < names.index("DKV_STORE_REDIS_URL")
    password = entries[names.index("REDIS_PASSWORD")]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "redis-pw", "key": "password"}
    assert entries[names.index("DKV_STORE_REDIS_URL")]["value"] == "redis://:$(REDIS_PASSWORD)@redis.example:6379/0"


def test_external_redis_without_password():
    docs = render({"redis": {"enabled": False}, "externalRedis": {"url": "rediss://r.example:6380/2"}})
    assert env_values(docs, "store")["DKV_STORE_REDIS_URL"] == "rediss://r.example:6380/2"
    assert "REDIS_PASSWORD" not in env(docs, "store")


def test_external_redis_cluster():
    docs = render(
        {
            "redis": {"enabled": False},
            "externalRedis": {"url": "redis://redis-cluster.db:6379/0", "cluster": True},
            "store": {"shards": 4, "redisNamespace": "team-a:"},
        }
    )
    store = env_values(docs, "store")
    assert (
        store["DKV_STORE_REDIS_URL"] == "redis://redis-cluster.db:6379/0" and store["DKV_STORE_REDIS_CLUSTER"] == "true"
    )
    settings = S.load(
        S.StoreSettings,
        {},
        env={k: v.replace("$(POD_NAME)", "rel-dkv-store-2") for k, v in store.items() if k.startswith("DKV_STORE_")},
    )
    assert (settings.redis_cluster, settings.redis_namespace, settings.redis_prefix) == (
        True,
        "team-a:",
        "dkv:rel-dkv-store-2:",
    )
    with pytest.raises(helm.HelmRenderError, match="in-chart Redis is one server"):
        render({"externalRedis": {"url": "redis://c:6379/0", "cluster": True}})
    with pytest.raises(helm.HelmValuesError, match="redisNamespace"):
        render({"store": {"redisNamespace": "has space"}})


def test_no_redis_fails_unless_the_redis_tier_is_off():
    with pytest.raises(helm.HelmRenderError, match="store.redisTier"):
        render({"redis": {"enabled": False}})
    docs = render({"redis": {"enabled": False}, "store": {"redisTier": False}})
    assert env_values(docs, "store")["DKV_STORE_REDIS_URL"] == ""
    with pytest.raises(helm.HelmRenderError, match="every store tier is disabled"):
        render({"store": {"redisTier": False, "cpuBytes": "0"}})


def test_auth_and_mutual_tls(everything_docs):
    for component in COMPONENTS:
        e = env(everything_docs, component)
        prefix = f"DKV_{component.upper()}_"
        assert e[prefix + "AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "dkv-auth", "key": "token"}
        assert e[prefix + "TENANT_TOKENS"]["valueFrom"]["secretKeyRef"] == {"name": "dkv-auth", "key": "tenants"}
        assert e[prefix + "TLS_CERT"]["value"] == "/etc/dkv/tls/tls.crt"
        assert e[prefix + "TLS_KEY"]["value"] == "/etc/dkv/tls/tls.key"
        assert e[prefix + "TLS_CA"]["value"] == "/etc/dkv/tls/ca.crt"
        pod = workload(everything_docs, component)["spec"]["template"]["spec"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/dkv/tls"]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "dkv-tls"
        # The kubelet's gRPC probe cannot speak TLS: tcpSocket probes on the gRPC port instead.
        c = pod["containers"][0]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["tcpSocket"] == {"port": "grpc"} and "grpc" not in c[probe], (component, probe)


def test_tls_without_mutual_and_missing_secret():
    docs = render({"tls": {"enabled": True, "existingSecret": "dkv-tls"}})
    for component in COMPONENTS:
        e = env(docs, component)
        assert f"DKV_{component.upper()}_TLS_CA" not in e  # servers do not ask for client certificates
        assert e["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"]["value"] == "/etc/dkv/tls/ca.crt"
        # auth is on by default, with the token the chart generated
        assert e[f"DKV_{component.upper()}_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{FULL}-auth",
            "key": "token",
        }
    with pytest.raises(helm.HelmRenderError, match="tls.existingSecret"):
        render({"tls": {"enabled": True}})


def test_network_policies(default_docs):
    policies = {p["metadata"]["name"]: p for p in of_kind(default_docs, "NetworkPolicy")}
    assert set(policies) == {f"{FULL}-{c}" for c in (*COMPONENTS, "redis")}

    def grpc_sources(component):
        (rule,) = [
            r for r in policies[f"{FULL}-{component}"]["spec"]["ingress"] if r["ports"][0]["port"] in ("grpc", "redis")
        ]
        return [
            f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component", f)
            for f in rule.get("from", [])
        ]

    assert grpc_sources("store") == ["prefill", "decode"]
    assert grpc_sources("redis") == ["store"]
    assert grpc_sources("gateway") == []  # no `from`: anyone
    (gateway_rule,) = [r for r in policies[f"{FULL}-gateway"]["spec"]["ingress"] if r["ports"][0]["port"] == "grpc"]
    assert [p["port"] for p in gateway_rule["ports"]] == ["grpc", "http"]  # gRPC and the OpenAI API alike
    for component in COMPONENTS:
        policy = policies[f"{FULL}-{component}"]
        assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        (metrics,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"]
        # by default only Prometheus pods (any namespace) may scrape
        assert metrics["from"] == [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
        ]

    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tools"}}}
    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    docs = render({"networkPolicy": {"store": {"extraFrom": [peer]}, "metricsFrom": [scraper]}})
    store = one(docs, "NetworkPolicy", f"{FULL}-store")
    grpc_rule, metrics_rule = store["spec"]["ingress"]
    assert grpc_rule["from"][-1] == peer and len(grpc_rule["from"]) == 3
    assert metrics_rule["from"] == [scraper]
    assert not of_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_service_monitor_only_with_the_capability(default_docs):
    assert not of_kind(default_docs, "ServiceMonitor")
    docs = render(api_versions=(SERVICE_MONITOR,))
    (sm,) = of_kind(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    selected = [
        s
        for s in of_kind(docs, "Service")
        if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        and "metrics" in {p["name"] for p in s["spec"]["ports"]}
    ]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in selected) == sorted(COMPONENTS)
    assert not of_kind(
        render({"metrics": {"serviceMonitor": {"enabled": False}}}, api_versions=(SERVICE_MONITOR,)), "ServiceMonitor"
    )


METRICS = {
    "dkv_rpc_duration_seconds",
    "dkv_store_lookups_total",
    "dkv_store_probed_keys_total",
    "dkv_store_hits_total",
    "dkv_store_misses_total",
    "dkv_store_used_bytes",
    "dkv_store_capacity_bytes",
    "dkv_store_entries",
    "dkv_store_evictions_total",
    "dkv_store_demotions_total",
    "dkv_store_promotions_total",
    "dkv_store_checksum_failures_total",
    "dkv_store_tier_errors_total",
    "dkv_prefill_tokens_total",
    "dkv_prefill_kept_tokens_total",
    "dkv_prefill_compression_ratio",
    "dkv_decode_tokens_total",
    "dkv_decode_tokens_per_second",
    "dkv_gateway_ttft_seconds",
    "dkv_gateway_requests_total",
}


def test_grafana_dashboard(default_docs):
    (cm,) = of_kind(default_docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["dkv.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"\bdkv_[a-z_]+", e)}
    assert used == METRICS, f"missing {METRICS - used}, unknown {used - METRICS}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert not of_kind(render({"metrics": {"dashboard": {"enabled": False}}}), "ConfigMap")


def test_pod_disruption_budgets():
    docs = render(
        {
            "store": {"pdb": {"minAvailable": 2}},
            "gateway": {"pdb": {"enabled": False}},
            "prefill": {"pdb": {"maxUnavailable": "50%"}},
        }
    )
    assert one(docs, "PodDisruptionBudget", f"{FULL}-store")["spec"] == {
        "minAvailable": 2,
        "selector": {"matchLabels": workload(docs, "store")["spec"]["selector"]["matchLabels"]},
    }
    assert one(docs, "PodDisruptionBudget", f"{FULL}-prefill")["spec"]["maxUnavailable"] == "50%"
    assert one(docs, "PodDisruptionBudget", f"{FULL}-decode")["spec"]["maxUnavailable"] == 1
    assert not [d for d in of_kind(docs, "PodDisruptionBudget") if d["metadata"]["name"] == f"{FULL}-gateway"]


def test_gateway_service_type():
    docs = render(
        {
            "gateway": {
                "service": {
                    "type": "LoadBalancer",
                    "nodePort": 30051,
                    "httpNodePort": 30080,
                    "loadBalancerSourceRanges": ["10.0.0.0/8"],
                }
            }
        }
    )
    svc = one(docs, "Service", f"{FULL}-gateway")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert {p["name"]: p.get("nodePort") for p in svc["spec"]["ports"]} == {
        "grpc": 30051,
        "http": 30080,
        "metrics": None,
    }


def test_the_http_api_can_be_turned_off():
    docs = render({"gateway": {"httpPort": 0}})
    assert env_values(docs, "gateway")["DKV_GATEWAY_HTTP_PORT"] == "0"
    assert "http" not in {p["name"] for p in container(docs, "gateway")["ports"]}
    assert "http" not in {p["name"] for p in one(docs, "Service", f"{FULL}-gateway")["spec"]["ports"]}
    ports = [p["port"] for r in one(docs, "NetworkPolicy", f"{FULL}-gateway")["spec"]["ingress"] for p in r["ports"]]
    assert ports == ["grpc", "metrics"]
    assert "OpenAI-compatible API" not in render_raw({"gateway": {"httpPort": 0}})["dkv/templates/NOTES.txt"]


def test_models_must_agree():
    with pytest.raises(helm.HelmRenderError, match="must be the same model"):
        render({"decode": {"model": "/models/other.gguf"}})


def test_notes():
    notes = render_raw()["dkv/templates/NOTES.txt"]
    assert f"{FULL}-gateway.{NAMESPACE}.svc:50051" in notes
    assert 'curl http://127.0.0.1:8000/v1/models -H "Authorization: Bearer $DKV_TOKEN"' in notes


# --- what must fail -----------------------------------------------------------------------------------

TYPO_VALUES = """\
store:
  shards: 2
  cpuBytez: 8GiB   # a typo of cpuBytes
"""


def test_a_values_file_with_a_typo_fails_the_schema(tmp_path):
    values = helm.values_from_yaml(TYPO_VALUES)
    with pytest.raises(helm.HelmValuesError, match="cpuBytez"):
        render(values)
    report = helm.lint(CHART, values)
    assert any("cpuBytez" in m["error"] for m in report["messages"] if m["severity"] == 3), report
    for bad, key in [
        ({"store": {"policy": "fifo"}}, "policy"),
        ({"store": {"cpuBytes": "lots"}}, "cpuBytes"),
        ({"decode": {"replicas": -1}}, "replicas"),
        ({"gateway": {"service": {"type": "Ingress"}}}, "type"),
        ({"externalRedis": {"url": "http://x"}}, "url"),
        ({"imagee": {}}, "imagee"),
    ]:
        with pytest.raises(helm.HelmValuesError, match=key):
            render(bad)


def test_a_broken_template_fails(tmp_path):
    broken = tmp_path / "dkv"
    shutil.copytree(CHART, broken)
    gateway = broken / "templates" / "gateway.yaml"
    gateway.write_text(
        gateway.read_text().replace('{{ include "dkv.service" $ctx }}', '{{ include "dkv.no-such-template" $ctx }}')
    )
    with pytest.raises(helm.HelmRenderError, match="no-such-template"):
        render(chart_dir=broken)
    assert helm.lint(broken)["messages"] and any(m["severity"] == 3 for m in helm.lint(broken)["messages"])
    # and a template that renders invalid YAML fails the parse of every document
    (broken / "templates" / "gateway.yaml").write_text((CHART / "templates" / "gateway.yaml").read_text())
    (broken / "templates" / "bad.yaml").write_text("kind: ConfigMap\nmetadata: [unclosed\n")
    with pytest.raises((helm.HelmError, yaml.YAMLError)):
        render(chart_dir=broken)
