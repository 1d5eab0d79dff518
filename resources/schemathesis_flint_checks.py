"""schemathesis checks for fuzz-api.sh's run against Firecracker's API description.

Loaded with SCHEMATHESIS_HOOKS=schemathesis_flint_checks (this directory on PYTHONPATH).

`valid_firecracker_request_accepted`: a request that Firecracker's description calls valid
(schemathesis' positive mode) must be accepted by flint's request parser. flint may still
refuse it for a reason the description cannot express (a file that does not exist, an id in
the body that differs from the one in the path, no permission to open /dev/kvm, a state the
VM is not in): such answers are 4xx with a sentence about that reason. What must never come
back for a valid request is a complaint about its shape: an unknown field, a missing field, a
wrong type, a value outside a set or range the description allows. Those are the sentences
flint's schema layer (src/api/schema.rs) writes, matched below.
"""

import re

import schemathesis

# The sentences of src/api/schema.rs and src/api/routes.rs that reject a body's shape.
SHAPE_COMPLAINTS = re.compile(
    r"unknown field"
    r"|missing required field"
    r"|must be a string"
    r"|must be true or false"
    r"|must be a whole number"
    r"|must be one of"
    r"|must be a JSON object"
    r"|expected a JSON object"
    r"|is not valid JSON"
    r"|needs a JSON body"
    r"|unknown action"
)


# Valid by the description, refused by flint with a reason it names, one by one:
# (operation, message pattern, why).
KNOWN_REFUSALS = [
    (
        "PUT /drives/{drive_id}",
        r"missing required field 'path_on_host'",
        "the description leaves path_on_host out for vhost-user drives (`socket`), which flint "
        "does not have; Firecracker refuses a drive with neither too",
    ),
    (
        "PUT /snapshot/load",
        r"missing required field 'mem_backend' \(or 'mem_file_path'\)",
        "the description marks neither required, as one of the two is; Firecracker refuses a "
        "load with neither too",
    ),
]


@schemathesis.check
def valid_firecracker_request_accepted(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if 200 <= status < 300:
        return None
    if status >= 500:
        raise AssertionError(f"a valid request got {status}")
    try:
        message = response.json().get("fault_message", "")
    except Exception:  # noqa: BLE001 - any undecodable body is a failure below
        message = None
    if not isinstance(message, str) or not message:
        raise AssertionError(f"a valid request got {status} without a fault_message")
    for operation, pattern, _why in KNOWN_REFUSALS:
        if case.operation.label == operation and re.search(pattern, message):
            return None
    if SHAPE_COMPLAINTS.search(message):
        raise AssertionError(
            f"flint refused a request that Firecracker's description calls valid: {message}"
        )
    return None


def as_firecracker_parses(spec_in, spec_out):
    """Write Firecracker's description with two rules its parser applies but the description
    leaves out, so that "valid" means what Firecracker itself accepts: every request body is
    required (Firecracker answers a PUT or PATCH without one with 400 "Empty PUT/PATCH
    request"), and an object takes no properties it does not list (Firecracker's request
    types refuse unknown fields), unless the description says otherwise (the MMDS contents,
    the metrics `properties` map)."""
    import yaml

    def bound_integer(name, schema):
        """An integer field takes what the Rust type Firecracker parses it into holds: every
        one is unsigned, `guest_cid` and the balloon's `amount_mib` are 32 bits, its
        `stats_polling_interval_s` 16 bits, those the description calls int64 are at most
        2^63 - 1, the rest 64 bits."""
        if not isinstance(schema, dict) or schema.get("type") != "integer":
            return
        schema.setdefault("minimum", 0)
        if name in ("guest_cid", "amount_mib"):
            largest = 2**32 - 1
        elif name == "stats_polling_interval_s":
            largest = 2**16 - 1
        elif schema.get("format") == "int64":
            largest = 2**63 - 1
        else:
            largest = 2**64 - 1
        schema.setdefault("maximum", largest)

    with open(spec_in, encoding="utf-8") as f:
        spec = yaml.safe_load(f)

    def close_objects(schema):
        """Apply both rules to one schema and the schemas inside it."""
        if not isinstance(schema, dict):
            return
        properties = schema.get("properties")
        if isinstance(properties, dict):
            schema.setdefault("additionalProperties", False)
            for name, sub in properties.items():
                bound_integer(name, sub)
                close_objects(sub)
        for key in ("items", "additionalProperties"):
            close_objects(schema.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in schema.get(key, []):
                close_objects(sub)

    for definition in spec.get("definitions", {}).values():
        close_objects(definition)
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "body":
                    parameter["required"] = True
                close_objects(parameter.get("schema"))
    with open(spec_out, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False)


if __name__ == "__main__":
    import sys

    as_firecracker_parses(sys.argv[1], sys.argv[2])
