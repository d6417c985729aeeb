#!/usr/bin/env python3
"""Parses Prometheus text exposition (stdin) with the official Python client's parser and prints
the families as JSON: [{"name", "type", "samples": [{"name", "labels", "value"}]}].

Any line the parser refuses (bad syntax, a sample before its family's TYPE with a conflicting
type, an unparsable value) makes it exit with status 1 and the parser's error on stderr, so a
malformed /metrics fails the test that reads it.
"""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def number(v: float):
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return v


def main() -> int:
    text = sys.stdin.read()
    try:
        families = [
            {
                "name": f.name,
                "type": f.type,
                "samples": [
                    {"name": s.name, "labels": dict(s.labels), "value": number(s.value)}
                    for s in f.samples
                ],
            }
            for f in text_string_to_metric_families(text)
        ]
    except Exception as e:  # the parser raises ValueError and friends on malformed input
        print(f"unparsable Prometheus text: {e!r}", file=sys.stderr)
        return 1
    json.dump(families, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
