"""`flexspec serve up | status | down`: registered into the core CLI through the
`flexspec_serve.commands` entry point, so the Ray-free core never imports this module."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deployments.config import APP_NAME
from flexspec_serve.edge.devices import CLOUD_PROFILES

log = logging.getLogger("flexspec.serve")


def register(sub) -> None:
    from deployments import loadtest, versions_cli

    loadtest.register(sub)
    versions_cli.register(sub)
    if "demo" in sub.choices:  # the core's demo grows into the end-to-end one when serving is installed
        from deployments import demo

        demo.add_arguments(sub.choices["demo"])
        sub.choices["demo"].set_defaults(func=demo.cmd_demo)
    serve_p = sub.add_parser("serve", help="run the cloud side on Ray Serve")
    ssub = serve_p.add_subparsers(dest="serve_cmd", required=True)
    up = ssub.add_parser("up", help="start an embedded local Ray (or join --address) and deploy the app")
    up.add_argument("--config", type=Path, help="AppConfig YAML (default: the family's v1 + v2, stable=v1, canary=v2)")
    up.add_argument("--profile", default="default", help="family profile when no --config is given")
    up.add_argument("--versions", nargs="+", default=["v1", "v2"], help="versions to deploy when no --config")
    add_emulate_cloud(up, "when no --config: ")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--address", help="an existing Ray cluster (e.g. auto); default: embedded local Ray")
    up.add_argument("--detach", action="store_true", help="start a local Ray head in the background and return")
    up.set_defaults(func=cmd_up)
    st = ssub.add_parser("status", help="deployment status and per-version statistics")
    st.add_argument("--address", default="auto")
    st.set_defaults(func=cmd_status)
    down = ssub.add_parser("down", help="delete the app; --stop-ray also stops a detached local Ray")
    down.add_argument("--address", default="auto")
    down.add_argument("--stop-ray", action="store_true")
    down.set_defaults(func=cmd_down)


def add_emulate_cloud(parser, when: str = "") -> None:
    """`--emulate-cloud PROFILE` for a command that deploys the family's versions itself."""
    parser.add_argument("--emulate-cloud", metavar="PROFILE", choices=sorted(CLOUD_PROFILES),
                        help=f"{when}hold every verify batch to this GPU cost profile's time, so the cloud answers as "
                        "that GPU would wherever this host is faster (VersionSpec.emulate_cloud)")


def app_config(args):
    from deployments.config import AppConfig
    from flexspec_serve import paths
    from flexspec_serve.config import load_yaml

    if args.config:
        return load_yaml(AppConfig, args.config)
    family = paths.family_dir(args.profile)
    if not (family / "manifest.json").exists():
        raise FileNotFoundError(f"no model family at {family}: run `flexspec zoo build --profile {args.profile}`")
    return family_app_config(family, args.versions, emulate_cloud=args.emulate_cloud)


def family_app_config(family: Path, versions: list[str], emulate_cloud: str | None = None, **kw):
    """The family's versions; stable = the first, canary = the second; `emulate_cloud`: every version's."""
    from deployments.config import AppConfig

    aliases = {"stable": versions[0]}
    if len(versions) > 1:
        aliases["canary"] = versions[1]
    return AppConfig.for_family(family, versions, aliases=kw.pop("aliases", aliases),
                                version_kw={"emulate_cloud": emulate_cloud}, **kw)


def start_local_app(cfg, port: int = 8000, address: str | None = None):
    """Start (or join) Ray and Serve and deploy the app; returns the router's DeploymentHandle."""
    import ray
    from ray import serve

    from deployments.app import deploy

    # An embedded Ray gets a logical CPU budget above the core count: replicas, router and fleet actors mostly
    # wait on one another, and a version added at run time must still find room to be scheduled.
    logical = None if address else max(8, os.cpu_count() or 1)
    ray.init(address=address, num_cpus=logical, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return deploy(cfg, APP_NAME)


def cmd_up(args) -> int:
    import ray
    from ray import serve

    cfg = app_config(args)
    if args.detach and not args.address:
        subprocess.run(["ray", "start", "--head", "--disable-usage-stats", "--include-dashboard=false"], check=True)
        args.address = "auto"
    start_local_app(cfg, args.port, args.address)
    print(f"flexspec-serve up: http://127.0.0.1:{args.port}  versions {[v.name for v in cfg.versions]}  "
          f"aliases {cfg.aliases}")
    if args.detach:
        return 0
    print("Ctrl-C to stop")
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.5)
    print("shutting down")
    serve.shutdown()  # further Ctrl-C only appends to `stop` and does not interrupt the shutdown
    ray.shutdown()
    return 0


def cmd_status(args) -> int:
    import ray
    from ray import serve

    ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    status = serve.status()
    for name, app in status.applications.items():
        print(f"app {name}: {app.status}")
        for dep, ds in app.deployments.items():
            print(f"  {dep:<28} {ds.status}  replicas {dict(ds.replica_states)}")
    return 0


def cmd_down(args) -> int:
    import ray
    from ray import serve

    ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    serve.delete(APP_NAME)
    serve.shutdown()
    if args.stop_ray:
        ray.shutdown()
        subprocess.run(["ray", "stop"], check=False)
    print("flexspec-serve down")
    return 0


if __name__ == "__main__":
    sys.exit(0)
