"""Offline validation of the SAM template, as `make test` runs it.

1. Translates template.yaml to CloudFormation with SAM's own translator (no AWS account: local
   CodeUri values become s3:// placeholders, managed policies are not looked up).
2. Lints the translated template with cfn-lint. Linting the SAM template itself misses most
   mistakes (a misspelt !GetAtt target, an invalid runtime), the translated one does not.
3. Checks that every function of the registry is a crate under functions/ (and every crate
   there but the local runtime is in the registry), has exactly one SAM function whose Binary
   is that crate, and that every function's Binary is one of them; and that a function is given
   only variables the registry says its binary reads.
4. Checks the secrets (PROTOCOL §4, invariant 8): no function's environment holds a secret's
   value (a `{{resolve:` reference, or a variable that carries one: PORTAL_JWT_SECRET,
   DATABASE_URL, …); each secret is named by a `…_SECRET_ARN` variable, and each function's role
   may read exactly the secrets its variables name.
5. Checks Bedrock: a function may invoke only the models of BedrockModelIds.
6. Checks the WebSocket API against the registry's route table: exactly its
   route keys, each integrated with the function the table names, each route but $connect and
   $disconnect with a route response (so the function's answer reaches the socket), and the
   stage's deployment waiting for every route.
7. Checks the dashboard and alarms: the dashboard's body is JSON, and every metric of the
   Konstruct/WebChat namespace they name is one the code emits.

The registry is the JSON document the code emits (`shared::registry::document`, printed by
`konstruct-local registry`): functions, routes, variables, metrics. Nothing here reads Rust
source.

Usage: python validate_template.py TEMPLATE --registry REGISTRY.json [--functions OUT.json]
OUT.json lists each function's binary and the environment variables it is given, for the test
that starts every binary with exactly those variables.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

# Values for the parameters without a default; any well-formed value translates the same way.
SAMPLE_PARAMETERS = {
    "DatabaseUrlSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:konstruct/database-url-AbCdEf",
    "MigratorDatabaseUrlSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:konstruct/migrator-AbCdEf",
    "PortalJwtSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:konstruct/portal-jwt-AbCdEf",
}
# Variables whose value would be a secret: a function names the secret instead (…_SECRET_ARN).
SECRET_VARIABLES = {"PORTAL_JWT_SECRET", "DATABASE_URL", "MIGRATOR_DATABASE_URL", "OPENAI_API_KEY"}
NOT_FUNCTIONS = {"konstruct-local"}


class OfflinePolicies:
    """SAM asks for the managed-policy name → ARN map only for policies named by name."""

    def load(self):
        return {}


def resolve(node, sam):
    """The value of a template expression with the parameters' defaults (Ref, Fn::Join,
    Fn::Split, Fn::Sub with pseudo parameters left as they are)."""
    if isinstance(node, list):
        return [resolve(n, sam) for n in node]
    if not isinstance(node, dict):
        return node
    (function, args), = node.items()
    if function == "Ref":
        parameter = sam.get("Parameters", {}).get(args, {})
        default = str(parameter.get("Default", args))
        return default.split(",") if parameter.get("Type") == "CommaDelimitedList" else default
    if function == "Fn::Join":
        values = resolve(args[1], sam)
        flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
        return args[0].join(flat)
    if function == "Fn::Split":
        return resolve(args[1], sam).split(args[0])
    if function == "Fn::Sub" and isinstance(args, str):
        return args
    fail(f"cannot resolve {function} in a policy resource")


def refs(node):
    """Every parameter or resource a template expression refers to with Ref (both branches of
    an Fn::If)."""
    if isinstance(node, list):
        return {r for n in node for r in refs(n)}
    if not isinstance(node, dict):
        return set()
    if set(node) == {"Ref"}:
        return {node["Ref"]}
    if "Fn::If" in node:
        return refs(node["Fn::If"][1:])
    return {r for v in node.values() for r in refs(v)}


def check_variables(sam, functions, binaries, registry):
    """Each function is given only variables its binary reads (shared/src/config/variables.rs)."""
    globals_env = sam.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
    for name, resource in functions.items():
        env = dict(globals_env)
        env.update(resource.get("Properties", {}).get("Environment", {}).get("Variables", {}) or {})
        for variable in sorted(env):
            if binaries[name] not in registry["variables"].get(variable, []):
                fail(f"{name}: is given {variable}, which {binaries[name]} does not read (the registry's variables)")


def check_secrets(sam, functions):
    """Invariant 8: secrets are named in the functions' environment, never placed there, and
    each function may read exactly the secrets it names."""
    globals_env = sam.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
    for name, resource in functions.items():
        env = dict(globals_env)
        env.update(resource.get("Properties", {}).get("Environment", {}).get("Variables", {}) or {})
        for variable, value in env.items():
            if "{{resolve:" in json.dumps(value):
                fail(f"{name}: {variable} resolves a secret into the function's configuration")
            if variable in SECRET_VARIABLES:
                fail(f"{name}: {variable} puts a secret in the function's configuration; name it with {variable}_SECRET_ARN")
        named = {r for v, value in env.items() if v.endswith("_SECRET_ARN") for r in refs(value)}
        readable = set()
        for policy in resource.get("Properties", {}).get("Policies", []) or []:
            for statement in policy.get("Statement", []) if isinstance(policy, dict) else []:
                actions = statement.get("Action", [])
                actions = [actions] if isinstance(actions, str) else actions
                if any(str(a).startswith("secretsmanager:") for a in actions):
                    if any(a != "secretsmanager:GetSecretValue" for a in actions):
                        fail(f"{name}: may do more with secrets than read them: {actions}")
                    readable |= refs(statement.get("Resource"))
        if readable != named:
            fail(
                f"{name}: its role may read the secrets {sorted(readable)} but its environment "
                f"names {sorted(named)}; they must be the same"
            )


def check_routes(sam, binaries, registry):
    """The WebSocket API's routes are the route table's, no more, no less."""
    expected = registry["routes"]

    resources = sam.get("Resources", {})

    def sub_text(node):
        return node.get("Fn::Sub") if isinstance(node, dict) else node

    routes, deployed = {}, {}
    for name, resource in resources.items():
        if resource.get("Type") != "AWS::ApiGatewayV2::Route":
            continue
        properties = resource.get("Properties", {})
        key = properties.get("RouteKey")
        if not key:
            fail(f"{name}: a route without a RouteKey (it has {sorted(properties)})")
        target = re.fullmatch(r"integrations/\$\{(\w+)\}", str(sub_text(properties.get("Target", ""))))
        integration = resources.get(target.group(1), {}) if target else {}
        uri = re.search(r"\$\{(\w+)\.Arn\}", str(sub_text(integration.get("Properties", {}).get("IntegrationUri", ""))))
        if not uri or uri.group(1) not in binaries:
            fail(f"{name} ({key}): its target is not an integration of one of the functions")
        routes[name], deployed[key] = key, binaries[uri.group(1)]
    if deployed != expected:
        missing = {k: v for k, v in expected.items() if deployed.get(k) != v}
        extra = {k: v for k, v in deployed.items() if expected.get(k) != v}
        fail(
            "the WebSocket routes are not the route table of the registry (shared/src/ws/routes.rs): "
            f"the table has {missing or 'nothing more'}, the template has {extra or 'nothing more'}"
        )
    answered = {
        resource.get("Properties", {}).get("RouteId", {}).get("Ref")
        for resource in resources.values()
        if resource.get("Type") == "AWS::ApiGatewayV2::RouteResponse"
    }
    for name, key in routes.items():
        if key not in ("$connect", "$disconnect") and name not in answered:
            fail(f"{name} ({key}) has no route response: the function's answer would not reach the socket")
    for name, resource in resources.items():
        if resource.get("Type") == "AWS::ApiGatewayV2::Deployment":
            waits = resource.get("DependsOn", [])
            waits = [waits] if isinstance(waits, str) else waits
            if set(routes) - set(waits):
                fail(f"{name} does not wait for the routes {sorted(set(routes) - set(waits))}")


def check_operations(sam, registry):
    """The dashboard parses, and names in our namespace are metrics the code emits."""
    metrics = registry["metrics"]
    emitted = set(metrics["counters"]) | set(metrics["histograms"])
    namespace = metrics["namespace"]
    named = set()
    for name, resource in sam.get("Resources", {}).items():
        properties = resource.get("Properties", {})
        if resource.get("Type") == "AWS::CloudWatch::Dashboard":
            body = properties.get("DashboardBody", {})
            text = body.get("Fn::Sub", body) if isinstance(body, dict) else body
            text = text[0] if isinstance(text, list) else text
            try:
                dashboard = json.loads(re.sub(r"\$\{[^}]+\}", "x", text))
            except (TypeError, json.JSONDecodeError) as error:
                fail(f"{name}: the dashboard body is not JSON: {error}")
            for widget in dashboard.get("widgets", []):
                for metric in widget.get("properties", {}).get("metrics", []):
                    if len(metric) > 1 and metric[0] == namespace:
                        named.add((name, metric[1]))
        if resource.get("Type") == "AWS::CloudWatch::Alarm":
            stats = [properties] + [
                m.get("MetricStat", {}).get("Metric", {}) for m in properties.get("Metrics", [])
            ]
            for stat in stats:
                if stat.get("Namespace") == namespace:
                    named.add((name, stat.get("MetricName")))
    for resource, metric in sorted(named):
        if metric not in emitted:
            fail(f"{resource}: metric {metric} of {namespace} is not one the code emits {sorted(emitted)}")


def fail(message):
    print(f"template: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("template")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--functions")
    args = parser.parse_args()
    registry = json.loads(pathlib.Path(args.registry).read_text())
    template_path = pathlib.Path(args.template)
    workspace = pathlib.Path(__file__).resolve().parent.parent
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    sam = yaml_parse(template_path.read_text())
    functions = {
        name: resource
        for name, resource in sam.get("Resources", {}).items()
        if resource.get("Type") == "AWS::Serverless::Function"
    }
    binaries = {}
    for name, resource in functions.items():
        metadata = resource.get("Metadata", {})
        if metadata.get("BuildMethod") != "rust-cargolambda":
            fail(f"{name}: Metadata.BuildMethod must be rust-cargolambda")
        binary = metadata.get("BuildProperties", {}).get("Binary")
        if not binary:
            fail(f"{name}: Metadata.BuildProperties.Binary is missing")
        binaries[name] = binary
        resource.setdefault("Properties", {})["CodeUri"] = f"s3://placeholder-bucket/{binary}.zip"
    sam.get("Globals", {}).get("Function", {}).pop("CodeUri", None)

    crates = sorted(
        d.name
        for d in (workspace / "functions").iterdir()
        if (d / "Cargo.toml").exists() and d.name not in NOT_FUNCTIONS
    )
    if sorted(registry["functions"]) != crates:
        fail(f"the registry's functions {sorted(registry['functions'])} are not the crates under functions/ {crates}")
    for crate in crates:
        owners = [n for n, b in binaries.items() if b == crate]
        if len(owners) != 1:
            fail(f"crate functions/{crate} has {len(owners)} SAM functions, not one: {owners}")
    for name, binary in binaries.items():
        if binary not in crates:
            fail(f"{name}: Binary {binary!r} is not a crate under functions/")

    check_secrets(sam, functions)
    check_variables(sam, functions, binaries, registry)
    check_operations(sam, registry)

    allowed_models = resolve({"Ref": "BedrockModelIds"}, sam)
    for name, resource in functions.items():
        for policy in resource.get("Properties", {}).get("Policies", []) or []:
            for statement in policy.get("Statement", []) if isinstance(policy, dict) else []:
                actions = statement.get("Action", [])
                actions = [actions] if isinstance(actions, str) else actions
                if not any(str(a).startswith("bedrock:") for a in actions):
                    continue
                resources = resolve(statement.get("Resource"), sam)
                for arn in resources if isinstance(resources, list) else [resources]:
                    model = arn.rsplit("/", 1)[-1] if "/" in arn else ""
                    if "*" in model or model not in allowed_models:
                        fail(f"{name}: Bedrock is allowed on {arn}, not on one of BedrockModelIds")

    try:
        translated = transform(sam, SAMPLE_PARAMETERS, OfflinePolicies())
    except Exception as error:  # the translator reports template errors as exceptions
        fail(f"SAM translation failed: {error}")

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as out:
        json.dump(translated, out, indent=1)
    lint = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "cfn-lint"), "--regions", "us-east-1", "--", out.name],
        capture_output=True,
        text=True,
    )
    os.unlink(out.name)
    if lint.returncode != 0:
        fail(f"cfn-lint found problems in the translated template:\n{lint.stdout}{lint.stderr}")

    # After the lint, which names a broken reference better than a route check could.
    check_routes(sam, binaries, registry)

    if args.functions:
        listing = {}
        for name, binary in binaries.items():
            variables = translated["Resources"][name]["Properties"].get("Environment", {})
            listing[binary] = sorted(variables.get("Variables", {}))
        pathlib.Path(args.functions).write_text(json.dumps(listing, indent=1, sort_keys=True))
    print(f"template: {len(translated['Resources'])} resources, lint clean")


if __name__ == "__main__":
    main()
