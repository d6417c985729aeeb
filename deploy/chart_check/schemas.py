"""The repo's JSON schemas in deploy/schemas/, for custom resources and for config files embedded
in ConfigMaps (the endpoint picker's), keyed by the apiVersion/kind each schema pins."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import yaml

from .common import SCHEMAS


def load_repo_schemas() -> dict[tuple[str, str], tuple[str, jsonschema.protocols.Validator]]:
    """deploy/schemas/*.json by the (apiVersion, kind) each one pins with `const`."""
    schemas: dict[tuple[str, str], tuple[str, jsonschema.protocols.Validator]] = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        props = schema["properties"]
        key = (props["apiVersion"]["const"], props["kind"]["const"])
        if key in schemas:
            raise SystemExit(f"{path.name}: a second schema for {key}")
        schemas[key] = (path.name, jsonschema.Draft202012Validator(schema))
    return schemas


REPO_SCHEMAS = load_repo_schemas()


def repo_schema_errors(doc: dict[str, Any]) -> list[str]:
    """Errors of `doc` against its schema in deploy/schemas/ (an error too when there is none)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in REPO_SCHEMAS:
        return [f"no schema for {key[0]} {key[1]} in deploy/schemas/ (custom resources need one)"]
    name, validator = REPO_SCHEMAS[key]
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message} ({name})" for e in errors]


def embedded_configs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Config files inside a ConfigMap that name an apiVersion and kind (the EPP's config)."""
    if doc.get("kind") != "ConfigMap":
        return []
    out = []
    for key, text in (doc.get("data") or {}).items():
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if isinstance(parsed, dict) and "apiVersion" in parsed and "kind" in parsed:
            out.append((key, parsed))
    return out
