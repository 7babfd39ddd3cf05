"""The shipped Dockerfile and Kubernetes manifests, checked without docker or a cluster.

Manifests: every document is validated field by field against the models of the pinned ``kubernetes`` client
(unknown or misspelt fields, wrong types and missing required fields fail), then checked against the server
itself: the probes hit real routes, the container arguments parse with ``wanstream serve``'s own parser, the
grace period covers ``--drain-grace``, the HPA scales on a gauge the server exports.
Dockerfile: every COPY source exists and is not excluded by .dockerignore, the install step is the project's own
``make env`` whose pip commands install the pins of pyproject.toml, the entrypoint is the ``wanstream`` script
and the default arguments parse. Not checked here (no docker, no cluster): that the base images can be pulled,
that the build succeeds, the GPU device plugin, the Prometheus adapter's behaviour (see docs/deploy.md).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
k8s = pytest.importorskip("kubernetes.client", reason="pip install -e '.[test]' (the pinned kubernetes client)")

from wanstream.cli.serve import configure_serve_parser, settings_from_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MODELS = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
          ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim", ("v1", "ConfigMap"): "V1ConfigMap",
          ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler"}


def check_model(data, type_name: str, where: str) -> None:
    """Raise AssertionError naming ``where`` when ``data`` does not fit the client model type ``type_name``."""
    m = re.fullmatch(r"(?:list|List)\[(.+)\]", type_name)
    if m:
        assert isinstance(data, list), f"{where}: a list expected, got {data!r}"
        for i, item in enumerate(data):
            check_model(item, m.group(1), f"{where}[{i}]")
        return
    m = re.fullmatch(r"(?:dict\(|Dict\[)str, (.+)[)\]]", type_name)
    if m:
        assert isinstance(data, dict), f"{where}: a mapping expected, got {data!r}"
        for key, value in data.items():
            check_model(value, m.group(1), f"{where}.{key}")
        return
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}
    if type_name in primitive:
        ok = isinstance(data, primitive[type_name]) and not (type_name == "int" and isinstance(data, bool))
        assert ok, f"{where}: {type_name} expected, got {data!r}"
        return
    if type_name == "object":                       # IntOrString and free-form fields
        return
    cls = getattr(k8s, type_name)
    assert isinstance(data, dict), f"{where}: a {type_name} mapping expected, got {data!r}"
    by_json = {j: attr for attr, j in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    assert not unknown, f"{where}: unknown field(s) {unknown} for {type_name}"
    for key, value in data.items():
        check_model(value, cls.openapi_types[by_json[key]], f"{where}.{key}")
    try:                                           # required fields and enums: the model's own validation
        cls(**{by_json[k]: v for k, v in data.items()})
    except ValueError as exc:
        raise AssertionError(f"{where}: {exc}") from None


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.name}#{i}", doc))
    return docs


def the(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"one {kind} {name or ''} expected in deploy/k8s, found {len(found)}"
    return found[0]


def serve_args(argv: list[str]) -> argparse.Namespace:
    return configure_serve_parser(argparse.ArgumentParser(exit_on_error=False)).parse_args(argv)


def test_every_manifest_fits_the_kubernetes_schema():
    docs = documents()
    assert {(d["apiVersion"], d["kind"]) for _, d in docs} == set(MODELS)
    for where, doc in docs:
        check_model(doc, MODELS[(doc["apiVersion"], doc["kind"])], where)


def test_the_schema_check_catches_mistakes():
    deployment = the("Deployment", "wanstream")
    with pytest.raises(AssertionError, match="unknown field"):
        check_model({**deployment, "spec": {**deployment["spec"], "replica": 2}}, "V1Deployment", "d")
    with pytest.raises(AssertionError, match="int expected"):
        check_model({**deployment, "spec": {**deployment["spec"], "replicas": "two"}}, "V1Deployment", "d")
    with pytest.raises(AssertionError, match="selector"):
        spec = {k: v for k, v in deployment["spec"].items() if k != "selector"}
        check_model({**deployment, "spec": spec}, "V1Deployment", "d")


def test_deployment_matches_the_server(tiny_model, tmp_path):
    from wanstream.server.app import create_app
    from wanstream.server.settings import ServerSettings
    deployment = the("Deployment", "wanstream")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = serve_args(container["args"])
    settings = settings_from_args(args)
    app = create_app(tiny_model, ServerSettings(width=64, height=64, record_dir=tmp_path))
    routes = {getattr(r, "path", None) for r in app.routes}
    assert container["readinessProbe"]["httpGet"]["path"] == "/api/ready" in routes
    assert container["livenessProbe"]["httpGet"]["path"] == "/api/health" in routes
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[container["readinessProbe"]["httpGet"]["port"]] == settings.port
    assert settings.host == "0.0.0.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > settings.drain_grace_s + pre_stop
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    model_mount = next(p for p in mounts if str(args.model).startswith(p + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[model_mount])
    assert the("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in (the("Service", "wanstream"), the("Service", "wanstream-pods")):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    assert the("Service", "wanstream")["spec"]["sessionAffinity"] == "ClientIP"
    # the HPA scales this Deployment on a gauge the server exports, which the adapter rule serves
    hpa = the("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    exported = app.state.manager.totals.render().decode()
    assert re.search(rf"^{name} ", exported, re.M), f"{name} is not in /metrics"
    rules = yaml.safe_load(the("ConfigMap", "wanstream-prometheus-adapter-rules")["data"]["config.yaml"])["rules"]
    assert any(r["seriesQuery"].startswith(name + "{") and r["name"]["as"] == name for r in rules)


def test_haproxy_in_the_cluster_routes_as_the_shipped_config():
    """deploy/k8s/haproxy.yaml: the routing lines of deploy/haproxy.cfg (new streams, stickiness, pinned servers,
    migration), pods from the headless Service; the wanstream pods migrate through it; haproxy accepts it."""
    import shutil
    cfg = the("ConfigMap", "wanstream-haproxy")["data"]["haproxy.cfg"]
    shipped = (ROOT / "deploy" / "haproxy.cfg").read_text()
    routing = [line.strip() for line in shipped.splitlines()
               if line.strip().startswith(("http-request", "http-response", "force-persist", "use-server", "acl",
                                           "balance", "http-check", "default-server", "http-error"))]
    assert len(routing) >= 14
    for line in routing:
        assert line in cfg, f"deploy/k8s/haproxy.yaml lacks: {line}"
    pods = the("Service", "wanstream-pods")
    assert re.search(rf"server-template \S+ \d+ {pods['metadata']['name']}\.\S+:{pods['spec']['ports'][0]['port']} ",
                     cfg)
    lb_deploy, lb = the("Deployment", "wanstream-lb"), the("Service", "wanstream-lb")
    (container,) = lb_deploy["spec"]["template"]["spec"]["containers"]
    assert re.search(rf"bind :{container['ports'][0]['containerPort']}\b", cfg)
    assert lb["spec"]["selector"].items() <= lb_deploy["spec"]["template"]["metadata"]["labels"].items()
    args = serve_args(the("Deployment", "wanstream")["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.migrate_to == f"http://{lb['metadata']['name']}" and lb["spec"]["ports"][0]["port"] == 80
    assert lb["metadata"]["name"] in args.allowed_host
    env = the("Deployment", "wanstream")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "WANSTREAM_ADMIN_TOKEN" and e["valueFrom"]["secretKeyRef"] for e in env)
    if shutil.which("haproxy"):
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".cfg") as f:
            f.write(cfg)
            f.flush()
            check = subprocess.run(["haproxy", "-c", "-f", f.name], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


# ---------------------------------------------------------------------------------------------- Dockerfile
def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def test_dockerfile_copies_existing_files_and_installs_with_make_env():
    steps = dockerfile()
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()]
    copies = [shlex.split(args) for word, args in steps if word == "COPY"]
    assert copies
    for parts in copies:
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the build context"
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"COPY {src} is in .dockerignore"
    copied = {src for parts in copies for src in parts[:-1]}
    # everything `pip install -e .` reads: pyproject, its readme, the package, and the Makefile that runs it
    assert {"pyproject.toml", "Makefile", "README.md", "wanstream"} <= copied
    runs = [args for word, args in steps if word == "RUN"]
    make = [r for r in runs if re.search(r"\bmake env\b", r)]
    assert len(make) == 1, "the image installs the project with the Makefile's `make env`"
    variables = dict(re.findall(r"\b(PYTHON|VENV)=(\S+)", make[0]))
    dry = subprocess.run(["make", "-n", "-B", "env", *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    pins = dict(re.findall(r'"(torch|torchvision)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    assert pins.keys() == {"torch", "torchvision"}
    for name, version in pins.items():
        assert f"{name}=={version}" in dry, f"make env does not install {name}=={version} (pyproject's pin)"
    assert f"{variables['VENV']}/bin/pip install" in dry and '-e ".[test]"' in dry
    assert not [r for r in runs if re.search(r"\bpip3? install\b", r)], "pip installs belong to make env"


def test_dockerfile_runs_wanstream_serve_with_valid_defaults():
    steps = dict(dockerfile()[::-1])                # the last of each instruction (the final stage)
    entry, cmd = json.loads(steps["ENTRYPOINT"]), json.loads(steps["CMD"])
    assert entry == ["wanstream", "serve"]
    assert re.search(r'(?m)^wanstream = "wanstream\.cli:main"$', (ROOT / "pyproject.toml").read_text())
    settings = settings_from_args(serve_args(cmd))
    assert steps["EXPOSE"] == str(settings.port) and settings.host == "0.0.0.0"
    froms = [args for word, args in dockerfile() if word == "FROM"]
    assert any("nvidia/cuda" in f and "runtime" in f for f in froms), "the GPU image is on a CUDA runtime base"
    assert any(re.search(r"AS base-cpu$", f) for f in froms) and froms[-1].startswith("base-${VARIANT}")
    with pytest.raises(argparse.ArgumentError):
        serve_args(["--model", "m", "--drain-grace", "-1"])     # the parser really checks what it is given
