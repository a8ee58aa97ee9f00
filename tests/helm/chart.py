"""Renders and checks the Helm chart for tests/helm.rs, with Helm's own Go SDK
(helm-python-sdk), kubernetes-validate and jsonschema; all offline.

    chart.py lint
    chart.py render VALUES.yaml [--kube-version v1.27.0] [--set JSON]   -> JSON on stdout
    chart.py validate VALUES.yaml --kube-version v1.27.0 [--set JSON]   -> problems, exit 1
    chart.py golden VALUES.yaml                                          -> the golden text

A values file may start with `# api-versions: A B ...`: the API versions (CRDs) the cluster
is taken to have, as `helm template --api-versions` does.
"""

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import helm_python as helm
import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
CHART = os.path.join(ROOT, "helm", "openinfer")
CRDS = os.path.join(ROOT, "tests", "crds")
RELEASE, NAMESPACE = "demo", "ai"
# The custom resources the chart may render, and their vendored schemas.
CUSTOM = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def api_versions(values_file):
    with open(values_file) as f:
        first = f.readline()
    prefix = "# api-versions:"
    return first[len(prefix):].split() if first.startswith(prefix) else []


def load_values(values_file, overlay):
    with open(values_file) as f:
        values = yaml.safe_load(f) or {}
    if overlay:
        merge(values, json.loads(overlay))
    return values


def merge(base, over):
    """Helm's coalescing: maps merge key by key, everything else (lists included) replaces."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v


def render(values_file, kube_version=None, overlay=None):
    """Template path -> rendered text, as `helm template` makes it (schema checked first)."""
    chart = helm.Chart.load(CHART)
    values = load_values(values_file, overlay)
    opts = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True}
    if kube_version:
        opts["kube_version"] = kube_version
    versions = api_versions(values_file)
    if versions:
        opts["api_versions"] = versions
    # The Python wrapper does not expose kube_version / api_versions; the C ABI takes them.
    from helm_python import _native

    out = _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts))
    return json.loads(out)


def documents(manifests):
    """The rendered objects, in template order (NOTES.txt left out)."""
    docs = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(manifests[path]):
            if doc:
                docs.append({"template": path, "object": doc})
    return docs


def golden(manifests):
    """The manifests as one text, with the dashboard's JSON replaced by its digest (it is its
    own file, checked on its own)."""
    out = []
    for d in documents(manifests):
        obj = copy.deepcopy(d["object"])
        data = obj.get("data") or {}
        for key, text in list(data.items()):
            if key.endswith(".json"):
                data[key] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        out.append("# Source: %s\n%s" % (d["template"], yaml.safe_dump(obj, sort_keys=True)))
    return "---\n".join(out)


def strict(schema):
    """A CRD schema made strict: objects that declare properties refuse others (what
    `kubectl apply --validate=strict` does with unknown fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in s
        and "additionalProperties" not in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        s["additionalProperties"] = False
    return s


def crd_schema(api_version, kind):
    group, version = api_version.split("/")
    with open(os.path.join(CRDS, "%s_%s_%s.json" % (group, version, kind))) as f:
        schema = strict(json.load(f))
    # metadata follows Kubernetes' own rules, not the CRD's.
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return schema


def kubernetes_validate(objects, kube_version):
    """kubernetes-validate --strict on built-in objects; returns its complaints."""
    if not objects:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(objects, f)
        path = f.name
    try:
        exe = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
        r = subprocess.run(
            [exe, "--strict", "--quiet", "-k", kube_version.lstrip("v"), path],
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(path)
    out = (r.stdout + r.stderr).strip()
    # WARN: a kind with no schema at this version (a custom resource left unchecked, or an
    # API that this Kubernetes does not have).
    if r.returncode != 0 or "WARN" in out:
        return [out]
    return []


def validate(values_file, kube_version, overlay=None):
    problems = []
    docs = documents(render(values_file, kube_version, overlay))
    builtin, pod_templates = [], []
    for d in docs:
        obj = d["object"]
        key = (obj.get("apiVersion"), obj.get("kind"))
        where = "%s %s/%s" % (d["template"], obj.get("kind"), obj.get("metadata", {}).get("name"))
        if key in CUSTOM:
            v = jsonschema.Draft7Validator(crd_schema(*key))
            for e in sorted(v.iter_errors(obj), key=lambda e: list(e.path)):
                problems.append("%s: %s at %s" % (where, e.message, "/".join(map(str, e.path))))
            if key[1] == "LeaderWorkerSet":
                # The pod templates inside, with Kubernetes' strict PodTemplateSpec schema.
                lwt = obj["spec"]["leaderWorkerTemplate"]
                for part in ("leaderTemplate", "workerTemplate"):
                    if part in lwt:
                        pod_templates.append(
                            {
                                "apiVersion": "v1",
                                "kind": "PodTemplate",
                                "metadata": {"name": "%s-%s" % (obj["metadata"]["name"], part.lower())},
                                "template": lwt[part],
                            }
                        )
        else:
            builtin.append(obj)
    problems += kubernetes_validate(builtin + pod_templates, kube_version)
    return problems


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("lint")
    for name in ("render", "validate", "golden"):
        s = sub.add_parser(name)
        s.add_argument("values")
        s.add_argument("--kube-version")
        s.add_argument("--set", dest="overlay", help="JSON merged over the values file")
    a = p.parse_args()
    try:
        if a.cmd == "lint":
            report = helm.lint(CHART, strict=True, namespace=NAMESPACE)
            print(json.dumps(report))
            sys.exit(1 if report.get("errors") or report.get("messages") else 0)
        if a.cmd == "render":
            manifests = render(a.values, a.kube_version, a.overlay)
            print(json.dumps({"documents": documents(manifests), "notes": manifests.get("openinfer/templates/NOTES.txt", "")}))
        elif a.cmd == "golden":
            sys.stdout.write(golden(render(a.values, a.kube_version, a.overlay)))
        elif a.cmd == "validate":
            problems = validate(a.values, a.kube_version, a.overlay)
            for problem in problems:
                print(problem)
            sys.exit(1 if problems else 0)
    except helm.HelmError as e:
        # Refused values or a failed template: the message is what `helm install` would say.
        print("helm: %s" % e, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
