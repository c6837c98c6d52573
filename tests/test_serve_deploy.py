"""`serve deploy deployments/serve.yaml` on a separately started local Ray cluster (slow: ~2 minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.serve]
REPO = Path(__file__).resolve().parents[1]


def test_serve_yaml_deploys_with_serve_deploy(tiny_family, tmp_path):
    import httpx

    bin_dir = Path(sys.executable).parent
    ray_cli, serve_cli = shutil.which("ray", path=str(bin_dir)), shutil.which("serve", path=str(bin_dir))
    assert ray_cli and serve_cli
    doc = yaml.safe_load((REPO / "deployments" / "serve.yaml").read_text())
    args = doc["applications"][0]["args"]
    args["draft_path"] = str(tiny_family / "draft")
    args["registry_path"] = str(tmp_path / "registry.json")
    for v in args["versions"] + [app["args"]["spec"] for app in doc["applications"][1:]]:
        v["path"] = str(tiny_family / v["name"])
        v["num_cpus"] = 0.25
    for app in doc["applications"][1:]:
        app["args"]["draft_path"] = args["draft_path"]
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(doc))
    # a throw-away loopback cluster: token auth off so the serve CLI can reach the dashboard API
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    port = 8000 + os.getpid() % 1000
    subprocess.run([ray_cli, "start", "--head", "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        subprocess.run([serve_cli, "start", "--http-host", "127.0.0.1", "--http-port", str(port)], check=True,
                       env=env, capture_output=True, timeout=180)
        deploy = subprocess.run([serve_cli, "deploy", str(config)], env=env, capture_output=True, text=True, timeout=180)
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
        deadline = time.monotonic() + 150
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the app did not come up"
            time.sleep(2)
        assert r.json()["versions"] == ["v1", "v2"]
        rnd = {"session_id": "deploy-1", "seq": 0, "target": "canary", "full_context": [5, 6, 7]}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/round", json=rnd, timeout=30).json()["version"] == "v2"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
