"""The Kubernetes manifests of deploy/kubernetes, validated offline.

Run by tests/tests/kubernetes_manifests.rs (no cluster needed):

    python3 tests/python/validate_manifests.py

- `kubectl kustomize deploy/kubernetes` renders the base.
- Every rendered object validates, with kubernetes-validate in strict mode
  (unknown fields fail), against the newest Kubernetes version the package
  knows: the Deployment, the Service, RBAC, the webhook configuration, and
  the CustomResourceDefinitions as apiextensions.k8s.io/v1 objects.
- Every document of deploy/examples, deploy/compose/config and
  deploy/nomad/config validates against its kind's CRD
  schema, unknown fields refused as `kubectl apply` refuses them; a spoiled
  example must fail, so that the check cannot pass by checking nothing.
- The objects agree with each other: namespaced objects are in
  infermesh-system, the Service and the PodDisruptionBudget select the
  Deployment's pods, ports and service accounts named exist.

Prints one line per check and "manifests: ok" at the end; exits 1 with
the kind, name and error of every object that fails.
"""

import copy
import pathlib
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMESPACE = "infermesh-system"
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
}

failures = []


def fail(what, detail):
    failures.append(f"{what}: {detail}")
    print(f"FAILED: {what}: {detail}", file=sys.stderr)


def ok(what, since):
    """Says `what` when no problem was found since `since` problems."""
    if len(failures) == since:
        print(f"ok: {what}")


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def render():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print(
            "kubectl not found: install it (Debian package kubernetes-client: "
            "`apt install kubernetes-client`), or run ./test.sh, which does",
            file=sys.stderr,
        )
        sys.exit(1)
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy/kubernetes")],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        print(f"kubectl kustomize deploy/kubernetes failed:\n{out.stderr}", file=sys.stderr)
        sys.exit(1)
    docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    print(f"ok: kubectl kustomize rendered {len(docs)} objects")
    return docs


def validate_objects(docs):
    version = kubernetes_validate.latest_version()
    since = len(failures)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            fail(name_of(doc), f"invalid for Kubernetes {e.version}: {path}: {e.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
            fail(name_of(doc), e.message)
    ok(f"every object validates against Kubernetes {version} (strict)", since)


def checker(schema):
    """A CRD's structural schema as a JSON Schema validator: `nullable`
    takes null, the x-kubernetes extensions open a node as the API server
    does, and objects refuse unknown fields (server-side field validation,
    kubectl apply's default, refuses them too)."""

    def convert(node, top):
        node = copy.deepcopy(node)
        if node.pop("x-kubernetes-int-or-string", False):
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        node.pop("x-kubernetes-preserve-unknown-fields", None)
        node.pop("example", None)
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if "properties" in node:
            node["properties"] = {
                key: convert(value, False) for key, value in node["properties"].items()
            }
            # metadata is the API server's to check.
            if not top:
                node.setdefault("additionalProperties", False)
        if isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = convert(node["additionalProperties"], False)
        if "items" in node:
            node["items"] = convert(node["items"], False)
        return node

    return jsonschema.Draft4Validator(convert(schema, True))


def validate_examples(docs):
    crds = {}
    for doc in docs:
        if doc["kind"] != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        for version in spec["versions"]:
            api_version = f"{spec['group']}/{version['name']}"
            schema = version["schema"]["openAPIV3Schema"]
            crds[(api_version, spec["names"]["kind"])] = checker(schema)
    # The example configs, and the mesh configs of the Compose and Nomad
    # set-ups: the same documents users apply to Kubernetes.
    examples = sorted(
        path
        for folder in ("deploy/examples", "deploy/compose/config", "deploy/nomad/config")
        for path in (ROOT / folder).rglob("*.y*ml")
    )
    since = len(failures)
    checked = 0
    first = None
    for path in examples:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                where = f"{path.relative_to(ROOT)}: {name_of(doc)}"
                validator = crds.get((doc.get("apiVersion"), doc.get("kind")))
                if validator is None:
                    fail(where, f"no CRD serves {doc.get('apiVersion')} {doc.get('kind')}")
                    continue
                for error in validator.iter_errors(doc):
                    path_text = ".".join(str(p) for p in error.path)
                    fail(where, f"{path_text}: {error.message}")
                checked += 1
                first = first or (validator, doc)
    if checked == 0:
        fail("deploy/examples", "no documents found")
        return
    ok(f"{checked} example documents (deploy/examples, compose, nomad) validate against their CRDs", since)
    # The check refuses what the API server refuses.
    since = len(failures)
    validator, doc = first
    spoiled = [copy.deepcopy(doc) for _ in range(3)]
    spoiled[0]["spec"]["bogus"] = 1
    spoiled[1]["spec"] = "not a mapping"
    del spoiled[2]["spec"]
    for bad in spoiled:
        if validator.is_valid(bad):
            fail("the example check", f"it takes a spoiled document: {bad}")
    ok("spoiled documents are refused", since)


def validate_references(docs):
    since = len(failures)
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] not in CLUSTER_SCOPED and namespace != NAMESPACE:
            fail(name_of(doc), f"in namespace {namespace!r}, not {NAMESPACE}")

    def matches(selector, labels):
        return all(labels.get(k) == v for k, v in selector.items())

    deployments = list(by_kind.get("Deployment", {}).values())
    if len(deployments) != 1:
        fail("Deployment", f"expected one, found {len(deployments)}")
        return
    deployment = deployments[0]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    if not matches(deployment["spec"]["selector"]["matchLabels"], labels):
        fail(name_of(deployment), "its selector does not select its own pods")
    container_ports = {
        port["name"]: port["containerPort"]
        for container in pod["spec"]["containers"]
        for port in container.get("ports", [])
    }
    service_accounts = by_kind.get("ServiceAccount", {})
    if pod["spec"].get("serviceAccountName") not in service_accounts:
        fail(name_of(deployment), f"service account {pod['spec'].get('serviceAccountName')!r} is not defined")
    for service in by_kind.get("Service", {}).values():
        if not matches(service["spec"]["selector"], labels):
            fail(name_of(service), "does not select the Deployment's pods")
        for port in service["spec"]["ports"]:
            if port["targetPort"] not in container_ports:
                fail(name_of(service), f"targetPort {port['targetPort']!r} is not a container port")
    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        if not matches(pdb["spec"]["selector"]["matchLabels"], labels):
            fail(name_of(pdb), "does not select the Deployment's pods")
    for binding in by_kind.get("ClusterRoleBinding", {}).values():
        if binding["roleRef"]["name"] not in by_kind.get("ClusterRole", {}):
            fail(name_of(binding), f"role {binding['roleRef']['name']!r} is not defined")
        for subject in binding["subjects"]:
            account = service_accounts.get(subject["name"])
            if account is None or account["metadata"]["namespace"] != subject["namespace"]:
                fail(name_of(binding), f"subject {subject} is not a defined service account")
    for configuration in by_kind.get("MutatingWebhookConfiguration", {}).values():
        for webhook in configuration["webhooks"]:
            target = webhook["clientConfig"]["service"]
            service = by_kind.get("Service", {}).get(target["name"])
            if service is None or service["metadata"]["namespace"] != target["namespace"]:
                fail(name_of(configuration), f"{webhook['name']}: no Service {target}")
                continue
            ports = {port["port"]: port for port in service["spec"]["ports"]}
            if target.get("port", 443) not in ports:
                fail(name_of(configuration), f"{webhook['name']}: Service has no port {target.get('port', 443)}")
    ok("the objects refer to each other consistently", since)


docs = render()
validate_objects(docs)
validate_examples(docs)
validate_references(docs)
if failures:
    print(f"{len(failures)} problem(s) in the Kubernetes manifests", file=sys.stderr)
    sys.exit(1)
print("manifests: ok")
