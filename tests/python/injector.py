"""The sidecar injector as the Kubernetes API server uses it.

Run by tests/tests/injector.rs against a control plane it starts with
--injector-listen:

    python3 injector.py WEBHOOK_ADDRESS CA_ROOT_PEM FIXTURES_DIR

For each AdmissionReview in FIXTURES_DIR (tests/fixtures/admission):

- POSTs it to https://WEBHOOK_ADDRESS/inject, trusting only the mesh CA's
  root and checking the certificate by the Service's name, as the API
  server does with the webhook's caBundle;
- checks the answer: an admission.k8s.io/v1 AdmissionReview with the
  request's uid, and what the fixture calls for (see EXPECTED);
- for an injected pod: applies the JSON Patch with `jsonpatch`, validates
  the patched pod with `kubernetes_validate` (strict, against Kubernetes
  1.33: native sidecars need 1.29 or later), checks what the injector
  added, and sends the patched pod again: it must be allowed, unpatched.

Prints one line per check and "injector: ok" at the end; exits non-zero
on the first check that fails.
"""

import base64
import http.client
import json
import pathlib
import re
import socket
import ssl
import sys
import uuid

import jsonpatch
import kubernetes_validate

address, ca_file, fixtures = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
host, port = address.rsplit(":", 1)

# The name the API server calls the webhook by (--injector-service and
# --namespace left at their defaults).
SERVICE_NAME = "infermesh-control-plane.infermesh-system.svc"
KUBERNETES_VERSION = "1.33.0"

# What each fixture calls for; every other one is injected.
EXPECTED = {
    "opted-out.json": "skipped",
    "bad-annotation.json": "refused",
}


def check(what, condition, detail=""):
    if not condition:
        print(f"FAILED: {what}: {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


class ServiceConnection(http.client.HTTPSConnection):
    """Connects to the webhook's address but checks its certificate
    against SERVICE_NAME, as the API server reaching it through its
    Service does."""

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=SERVICE_NAME)


context = ssl.create_default_context(cafile=ca_file)


def post(review):
    connection = ServiceConnection(host, int(port), context=context, timeout=10)
    body = json.dumps(review).encode()
    connection.request(
        "POST",
        "/inject?timeout=10s",
        body=body,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    response = connection.getresponse()
    text = response.read()
    connection.close()
    check("the webhook answers 200", response.status == 200, f"{response.status}: {text!r}")
    answer = json.loads(text)
    check(
        "an admission.k8s.io/v1 AdmissionReview",
        answer.get("apiVersion") == "admission.k8s.io/v1"
        and answer.get("kind") == "AdmissionReview",
        answer,
    )
    check(
        "the request's uid is echoed",
        answer["response"]["uid"] == review["request"]["uid"],
        answer["response"],
    )
    return answer["response"]


def validate(pod, what):
    try:
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        check(what, False, f"{e.message} at {list(e.path)}")
    check(what, True)


IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def kubernetes_rules(pod, what):
    """Rules of the API server's own validation that the OpenAPI schema
    does not hold: unique container and volume names, mounts of volumes
    that exist, port names of at most 15 characters (IANA_SVC_NAME)."""
    spec = pod["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    names = [c["name"] for c in containers]
    check(f"{what}: container names are unique", len(names) == len(set(names)), names)
    volumes = [v["name"] for v in spec.get("volumes", [])]
    check(f"{what}: volume names are unique", len(volumes) == len(set(volumes)), volumes)
    for container in containers:
        for mount in container.get("volumeMounts", []):
            check(
                f"{what}: {container['name']} mounts the volume {mount['name']}, which exists",
                mount["name"] in volumes,
                volumes,
            )
        for port in container.get("ports", []):
            if "name" in port:
                check(
                    f"{what}: port name {port['name']} is an IANA_SVC_NAME",
                    len(port["name"]) <= 15
                    and "--" not in port["name"]
                    and IANA_SVC_NAME.match(port["name"]),
                    port,
                )


def env(container):
    return {e["name"]: e for e in container.get("env", [])}


def check_injected(name, original, pod):
    init = pod["spec"]["initContainers"]
    names = [c["name"] for c in init]
    before = [c["name"] for c in original["spec"].get("initContainers", [])]
    check(
        f"{name}: infermesh-init first, the sidecar next, the pod's own init containers after",
        names == ["infermesh-init", "infermesh-proxy"] + before,
        names,
    )
    proxy = init[1]
    check(f"{name}: the proxy is a native sidecar", proxy.get("restartPolicy") == "Always")
    check(
        f"{name}: the proxy's startup probe holds the app until it is ready",
        proxy["startupProbe"]["httpGet"] == {"path": "/ready", "port": 15020},
    )
    variables = env(proxy)
    check(
        f"{name}: the trust bundle is given as PEM",
        variables["INFERMESH_TRUST_BUNDLE_PEM"]["value"].strip()
        == pathlib.Path(ca_file).read_text().strip(),
    )
    check(
        f"{name}: the node name comes from the pod's name",
        variables["INFERMESH_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name",
    )
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    token = volumes["infermesh-token"]["projected"]["sources"][0]["serviceAccountToken"]
    check(
        f"{name}: a ServiceAccount token for the audience infermesh",
        token == {"audience": "infermesh", "expirationSeconds": 3600, "path": "token"},
        token,
    )
    # Every HTTP probe of an app container now asks the sidecar, which
    # holds the original.
    probes = json.loads(variables.get("INFERMESH_APP_PROBES", {}).get("value", "{}"))
    originals = {c["name"]: c for c in original["spec"]["containers"]}
    moved = 0
    for container in pod["spec"]["containers"]:
        before = originals[container["name"]]
        for field, segment in [
            ("livenessProbe", "livez"),
            ("readinessProbe", "readyz"),
            ("startupProbe", "startupz"),
        ]:
            if field not in before:
                continue
            if "httpGet" not in before[field]:
                check(
                    f"{name}: {container['name']}'s {field} (not httpGet) is kept",
                    container[field] == before[field],
                )
                continue
            path = f"/app-health/{container['name']}/{segment}"
            check(
                f"{name}: {container['name']}'s {field} asks the sidecar",
                container[field]["httpGet"] == {"path": path, "port": 15020, "scheme": "HTTP"},
                container[field],
            )
            original_get = before[field]["httpGet"]
            held = probes.get(path)
            check(f"{name}: the sidecar holds {path}", held is not None, probes)
            check(
                f"{name}: {path} keeps the original path and scheme",
                held["path"] == original_get.get("path", "/")
                and held["scheme"] == original_get.get("scheme", "HTTP")
                and held["httpHeaders"] == original_get.get("httpHeaders", []),
                held,
            )
            wanted = original_get["port"]
            if isinstance(wanted, str):
                wanted = next(
                    p["containerPort"] for p in before["ports"] if p.get("name") == wanted
                )
            check(f"{name}: {path} goes to port {wanted}", held["port"] == wanted, held)
            moved += 1
    check(f"{name}: no other probe is held", len(probes) == moved, probes)


for fixture in sorted(fixtures.glob("*.json")):
    name = fixture.name
    review = json.loads(fixture.read_text())
    original = review["request"]["object"]
    validate(original, f"{name}: the fixture's pod is valid")
    response = post(review)
    expected = EXPECTED.get(name, "injected")
    if expected == "skipped":
        check(f"{name}: allowed", response["allowed"] is True, response)
        check(
            f"{name}: no patch",
            "patch" not in response and "patchType" not in response,
            response,
        )
        continue
    if expected == "refused":
        check(f"{name}: refused", response["allowed"] is False, response)
        message = response["status"]["message"]
        check(
            f"{name}: the reason names the annotation",
            "infermesh.io/exclude-inbound-ports" in message,
            message,
        )
        continue

    check(f"{name}: allowed", response["allowed"] is True, response)
    check(f"{name}: a JSONPatch", response.get("patchType") == "JSONPatch", response)
    operations = json.loads(base64.b64decode(response["patch"]))
    patched = jsonpatch.JsonPatch(operations).apply(original)
    validate(patched, f"{name}: the injected pod is valid for Kubernetes {KUBERNETES_VERSION}")
    kubernetes_rules(patched, name)
    check_injected(name, original, patched)

    again = json.loads(json.dumps(review))
    again["request"]["uid"] = str(uuid.uuid4())
    again["request"]["object"] = patched
    response = post(again)
    check(f"{name}: injecting it again is allowed", response["allowed"] is True, response)
    check(f"{name}: and patches nothing", "patch" not in response, response)

print("injector: ok")
