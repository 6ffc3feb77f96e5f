"""``pip install dkv`` is a client without the server stack: ``from dkv import Client`` and
``dkv generate`` work where torch cannot be imported.

The client runs in a subprocess whose ``sitecustomize`` (found first on ``PYTHONPATH``) makes every
package of ``dkv[server]`` and ``dkv[bench]`` unimportable, as they are after ``pip install dkv``,
and talks to a real gateway (over loopback gRPC) serving a small random-weight Llama. That the
wheel asks for nothing heavier is tests/integration/test_packaging.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from in_process import serving

from dkv.kvstore.recipe import Recipe
from dkv.services.client import DkvClient
from dkv.workers.model import load_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Top-level modules of the packages dkv[server] and dkv[bench] bring (and what they pull).
SERVER_MODULES = (
    "torch",
    "transformers",
    "triton",
    "ray",
    "redis",
    "xxhash",
    "gguf",
    "accelerate",
    "safetensors",
    "tqdm",
    "huggingface_hub",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
    "fastapi",
    "uvicorn",
    "starlette",
    "matplotlib",
)
SITECUSTOMIZE = f'''
import sys

BLOCKED = {SERVER_MODULES!r}


class NotInstalled:
    """Imports of the server stack fail as they do where it is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
'''
CONTEXT = "The lighthouse on Skerry Point was built in 1871 by the engineer Thomas Pell. " * 4
QUERY = "\nWho built the lighthouse?"


@pytest.fixture(scope="module")
def light_env(tmp_path_factory) -> dict:
    site = tmp_path_factory.mktemp("light-install")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": str(site)}


@pytest.fixture(scope="module")
def gateway(random_models):
    from in_process import InProcessServer

    from dkv.services.settings import StoreSettings
    from dkv.services.store_server import StoreServer

    store = InProcessServer(StoreServer(StoreSettings(port=0, cpu_bytes=64 << 20)))
    try:
        with serving(str(random_models["llama"]), store.address) as address:
            yield address
    finally:
        store.stop()


def run_light(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd="/", env=env, capture_output=True, text=True, timeout=120)


def test_the_blocker_makes_the_server_stack_unimportable(light_env):
    out = run_light(light_env, "-c", "import torch")
    assert out.returncode == 1 and "ModuleNotFoundError: No module named 'torch'" in out.stderr


def test_the_client_generates_without_torch(light_env, gateway, random_models):
    tokenizer = load_tokenizer(str(random_models["llama"]))
    context = tokenizer(CONTEXT, add_special_tokens=False).input_ids
    query = tokenizer(QUERY, add_special_tokens=False).input_ids
    with DkvClient(gateway) as client:  # the same call with the full install, for the expected answer
        expected, _ = client.ask(context, query, recipe=Recipe(method="snapkv", ratio=0.5), max_new_tokens=8)
    assert expected.strip()
    probe = textwrap.dedent(f"""
        import json, sys
        import dkv
        from dkv import Client, Recipe
        with Client({gateway!r}) as client:
            text, stats = client.ask({context!r}, {query!r}, recipe=Recipe(method="snapkv", ratio=0.5),
                                     max_new_tokens=8)
        heavy = sorted(m for m in sys.modules if m.partition(".")[0] in {SERVER_MODULES!r})
        print(json.dumps({{"text": text, "hit": stats.cache_hit, "heavy": heavy}}))
    """)
    out = run_light(light_env, "-c", probe)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result == {"text": expected, "hit": True, "heavy": []}


def test_dkv_generate_runs_without_torch_and_dkv_up_says_what_to_install(light_env, gateway):
    out = run_light(
        light_env, "-m", "dkv", "generate", CONTEXT, QUERY, "--raw", "--address", gateway, "--max-new-tokens", "4"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() and json.loads(out.stderr[out.stderr.index("{") :])["newTokens"] >= 1
    out = run_light(light_env, "-m", "dkv", "up", "--port", "0")
    assert out.returncode == 1
    (line,) = out.stderr.splitlines()
    assert line.startswith("dkv: ") and "is not installed" in line and "pip install 'dkv[server]'" in line
