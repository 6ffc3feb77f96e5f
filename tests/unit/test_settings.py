"""dkv.services.settings: sizes, precedence flag > env > YAML > default, and validation messages."""

from __future__ import annotations

import argparse

import pytest

from dkv.services.settings import (
    DecodeSettings,
    PrefillSettings,
    SettingsError,
    StoreSettings,
    add_arguments,
    describe,
    load,
    parse_size,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("512MiB", 512 * 1024**2),
        ("2GB", 2 * 1000**3),
        ("1.5KiB", 1536),
        ("1024", 1024),
        (1024, 1024),
        (0, 0),
        ("0", 0),
        ("10k", 10_000),
        ("10K", 10_000),
        ("3 MiB", 3 * 1024**2),
        (" 4gib ", 4 * 1024**3),
        ("1Ti", 1024**4),
        ("2TB", 2 * 1000**4),
        ("7b", 7),
        ("7B", 7),
        ("2.5M", 2_500_000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-5", "5XB", "1.5.2", "MiB", "5 MiBs", "1e9", "5 k b", "0x10"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="is not a size; use bytes or a unit like 512MiB, 2GB"):
        parse_size(text)


def test_defaults():
    s = load(StoreSettings, {}, env={})
    assert s == StoreSettings()
    assert (s.host, s.port, s.cpu_bytes, s.policy, s.redis_url) == ("127.0.0.1", 50052, 1 << 30, "value", "")


def _yaml(tmp_path, text: str):
    path = tmp_path / "store.yaml"
    path.write_text(text)
    return path


def test_precedence_flag_env_yaml_default(tmp_path):
    cfg = _yaml(tmp_path, "port: 1111\ncpu_bytes: 2GiB\npolicy: lru\nlog_level: debug\ngrace_s: 7\n")
    env = {"DKV_STORE_PORT": "2222", "DKV_STORE_CPU_BYTES": "1MiB", "DKV_STORE_LOG_LEVEL": "warning"}
    flags = {"port": "3333", "config": str(cfg)}
    s = load(StoreSettings, flags, env=env)
    assert s.port == 3333  # flag beats env and YAML
    assert s.cpu_bytes == 1024**2  # env beats YAML
    assert s.log_level == "warning"  # env beats YAML
    assert s.policy == "lru"  # YAML beats default
    assert s.grace_s == 7.0 and isinstance(s.grace_s, float)
    assert s.redis_bytes == 4 << 30 and s.host == "127.0.0.1"  # defaults
    # Each layer removed in turn shows the next one.
    assert load(StoreSettings, {"config": str(cfg)}, env=env).port == 2222
    assert load(StoreSettings, {"config": str(cfg)}, env={}).port == 1111
    assert load(StoreSettings, {}, env={}).port == 50052


def test_config_from_argument_and_env(tmp_path):
    cfg = _yaml(tmp_path, "port: 1111\n")
    assert load(StoreSettings, {}, env={}, config=cfg).port == 1111
    assert load(StoreSettings, {}, env={"DKV_STORE_CONFIG": str(cfg)}).port == 1111
    other = tmp_path / "other.yaml"
    other.write_text("port: 2222\n")
    assert load(StoreSettings, {"config": str(other)}, env={"DKV_STORE_CONFIG": str(cfg)}).port == 2222


def test_flags_from_argparse(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser, StoreSettings)
    cfg = _yaml(tmp_path, "redis_url: redis://localhost:6379/0\n")
    args = parser.parse_args(["--port", "4444", "--cpu-bytes", "512MiB", "--config", str(cfg), "--cpu-quant", "int4"])
    s = load(StoreSettings, args, env={"DKV_STORE_PORT": "1"})
    assert (s.port, s.cpu_bytes, s.cpu_quant, s.redis_url) == (4444, 512 * 1024**2, "int4", "redis://localhost:6379/0")
    help_text = " ".join(parser.format_help().split())
    assert "DKV_STORE_CPU_BYTES" in help_text and "--redis-keep-fraction" in help_text
    assert "One of: none, int8, int4, mixed." in help_text
    assert "One of: value, lru." in help_text


def test_unknown_yaml_key_lists_known(tmp_path):
    cfg = _yaml(tmp_path, "port: 1\ncpu_byts: 1GiB\n")
    with pytest.raises(SettingsError, match=r"unknown settings \['cpu_byts'\]; known: \[.*'cpu_bytes'.*'port'.*\]"):
        load(StoreSettings, {"config": str(cfg)}, env={})


def test_bad_config_files(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load(StoreSettings, {"config": str(tmp_path / "missing.yaml")}, env={})
    cfg = _yaml(tmp_path, "- 1\n- 2\n")
    with pytest.raises(SettingsError, match="must be a YAML mapping"):
        load(StoreSettings, {"config": str(cfg)}, env={})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load(StoreSettings, {"config": str(empty)}, env={}) == StoreSettings()


@pytest.mark.parametrize(
    "flags,pattern",
    [
        ({"port": "70000"}, r"setting port = 70000 must be between 0 and 65535"),
        ({"port": "-1"}, r"setting port = -1 must be between 0 and 65535"),
        (
            {"cpu_quant": "int3"},
            r"setting cpu_quant = 'int3' is not allowed; use one of \['int4', 'int8', 'mixed', 'none'\]",
        ),
        ({"redis_quant": "fp8"}, r"setting redis_quant = 'fp8' is not allowed; use one of"),
        ({"policy": "lfu"}, r"setting policy = 'lfu' is not allowed; use one of \['lru', 'value'\]"),
        (
            {"log_level": "trace"},
            r"setting log_level = 'trace' is not allowed; use one of \['debug', 'error', 'info', 'warning'\]",
        ),
        ({"redis_url": "http://x"}, r"setting redis_url = 'http://x' must start with redis:// or rediss://"),
        ({"device": "tpu"}, r"setting device = 'tpu' is not allowed; use auto, cpu, cuda or cuda:N"),
        ({"cpu_keep_fraction": "0"}, r"setting cpu_keep_fraction = 0.0 must be between 0.01 and 1.0"),
        ({"redis_keep_fraction": "1.5"}, r"setting redis_keep_fraction = 1.5 must be between 0.01 and 1.0"),
        ({"grace_s": "-1"}, r"setting grace_s = -1.0 must be between 0 and 3600"),
        ({"cpu_bytes": "0", "device_bytes": "0"}, r"every tier is disabled: set device_bytes, cpu_bytes or redis_url"),
        ({"port": "abc"}, r"setting port \(--port\) = 'abc' is invalid"),
        ({"cpu_bytes": "lots"}, r"setting cpu_bytes \(--cpu-bytes\) = 'lots' is invalid: .*512MiB"),
    ],
)
def test_invalid_values_name_setting_and_allowed(flags, pattern):
    with pytest.raises(SettingsError, match=pattern):
        load(StoreSettings, flags, env={})


def test_invalid_value_from_env_and_yaml_names_source(tmp_path):
    with pytest.raises(SettingsError, match=r"setting cpu_bytes \(DKV_STORE_CPU_BYTES\) = 'lots' is invalid"):
        load(StoreSettings, {}, env={"DKV_STORE_CPU_BYTES": "lots"})
    cfg = _yaml(tmp_path, "port: many\n")
    with pytest.raises(SettingsError, match=r"setting port \(.*store\.yaml:port\) = 'many' is invalid"):
        load(StoreSettings, {"config": str(cfg)}, env={})
    cfg = _yaml(tmp_path, "cpu_quant: int3\n")
    with pytest.raises(SettingsError, match="cpu_quant"):
        load(StoreSettings, {"config": str(cfg)}, env={})


def test_only_redis_tier_is_enough():
    s = load(StoreSettings, {"cpu_bytes": "0", "redis_url": "rediss://h:1/0"}, env={})
    assert s.cpu_bytes == 0 and s.redis_url == "rediss://h:1/0"
    assert StoreSettings(cpu_bytes=0, device_bytes=1).device_bytes == 1


def test_direct_construction_validates():
    with pytest.raises(SettingsError, match="port"):
        StoreSettings(port=70000)
    assert issubclass(SettingsError, ValueError)
    for device in ("auto", "cpu", "cuda", "cuda:3"):
        assert StoreSettings(device=device).device == device


def test_describe():
    d = describe(StoreSettings(port=1))
    assert d["port"] == 1 and d["cpu_quant"] == "none" and set(d) >= {"host", "redis_url", "max_entry_bytes"}


def test_describe_masks_secrets():
    d = describe(StoreSettings(auth_token="s3cret", tenant_tokens="acme=t1"))
    assert d["auth_token"] == d["tenant_tokens"] == "***" and "s3cret" not in str(d)
    assert describe(StoreSettings())["auth_token"] == ""


@pytest.mark.parametrize("cls", [PrefillSettings, DecodeSettings])
def test_worker_device_and_dtype(cls):
    assert (cls().device, cls().dtype) == ("auto", "auto")
    env = {f"DKV_{cls.component.upper()}_DEVICE": "cuda:1", f"DKV_{cls.component.upper()}_DTYPE": "bfloat16"}
    loaded = load(cls, {}, env=env)
    assert (loaded.device, loaded.dtype) == ("cuda:1", "bfloat16")
    assert load(cls, {"device": "cpu", "dtype": "float16"}, env=env).device == "cpu"  # the flag wins
    with pytest.raises(SettingsError, match=r"setting device = 'gpu' is not allowed; use auto, cpu, cuda or cuda:N"):
        cls(device="gpu")
    with pytest.raises(
        SettingsError, match=r"setting dtype = 'float64' .* \['auto', 'bfloat16', 'float16', 'float32'\]"
    ):
        load(cls, {}, env={f"DKV_{cls.component.upper()}_DTYPE": "float64"})


def test_ray_actor_placement_follows_the_device_setting():
    from dkv.services.ray_pool import actor_placement

    assert actor_placement("cpu", 2, cluster_gpus=4) == (0, "cpu")
    assert actor_placement("cuda", 2, cluster_gpus=2) == (1, "cuda")
    assert actor_placement("auto", 2, cluster_gpus=2) == (1, "cuda")
    assert actor_placement("auto", 3, cluster_gpus=2) == (0, "cpu")  # not one GPU each: none
    with pytest.raises(SettingsError, match="one GPU for each of the 3 worker actors, but the Ray cluster has 2"):
        actor_placement("cuda", 3, cluster_gpus=2)
    with pytest.raises(SettingsError, match="Ray assigns each actor its GPU"):
        actor_placement("cuda:1", 1, cluster_gpus=2)


def test_describe_masks_the_cluster_secret_and_the_password_in_redis_url():
    d = describe(StoreSettings(cluster_secret="mac-key-1", redis_url="redis://:pw-8812@redis.ns.svc:6379/0"))
    assert d["cluster_secret"] == "***" and d["redis_url"] == "redis://:***@redis.ns.svc:6379/0"
    assert "pw-8812" not in str(d) and "mac-key-1" not in str(d)
    assert describe(StoreSettings(redis_url="redis://user:pw@h:1/2"))["redis_url"] == "redis://user:***@h:1/2"
    assert describe(StoreSettings(redis_url="redis://h:6379/0"))["redis_url"] == "redis://h:6379/0"  # nothing to mask


def test_the_put_budget_must_hold_the_largest_entry():
    with pytest.raises(SettingsError, match="put_bytes_in_flight .* below max_entry_bytes"):
        StoreSettings(max_entry_bytes=1 << 30, put_bytes_in_flight=512 << 20)
    assert StoreSettings(max_entry_bytes=256 << 20, put_bytes_in_flight=512 << 20).put_bytes_in_flight == 512 << 20
    with pytest.raises(SettingsError, match="max_lookup_tokens"):
        StoreSettings(min_chunk_size=64, max_lookup_tokens=32)  # not even one chunk


def test_the_gateway_s_http_port():
    from dkv.services.settings import GatewaySettings

    assert GatewaySettings().http_port == 0  # off unless asked for (dkv up asks for 8000)
    assert load(GatewaySettings, {}, env={"DKV_GATEWAY_HTTP_PORT": "8000"}).http_port == 8000
    with pytest.raises(SettingsError, match=r"settings port and http_port are both 9000"):
        GatewaySettings(port=9000, http_port=9000)
    with pytest.raises(SettingsError, match=r"setting http_port = 70000 must be between 0 and 65535"):
        GatewaySettings(http_port=70000)
