"""`stemqa config`: print the resolved config (a preset or file with overrides) or the schema."""
from __future__ import annotations

from stemqa.cli.common import config_from, parser
from stemqa.config import to_yaml
from stemqa.config.load import dump_schema


def main(argv=None) -> int:
    p = parser("stemqa config", __doc__)
    p.add_argument("--schema", action="store_true", help="print every field with its type, default and description")
    args = p.parse_args(argv)
    if args.schema:
        print("\n".join(dump_schema()))
    else:
        print(to_yaml(config_from(args)), end="")
    return 0

