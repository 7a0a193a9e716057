"""The configuration reference, generated from the schema in `ulvideo/config.py`:

    python -m ulvideo.config_docs > docs/configuration.md

A field's description is the comment written next to it there: the comment lines directly above
the field (for a group of fields, it names the group) and the comment at the end of its line. Every field must have one (`field_docs` raises
otherwise), and tests/test_config_fields.py checks that the committed file is current.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import json
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

from ulvideo import config as config_module
from ulvideo.config import Config

SOURCE = Path(config_module.__file__)
COMMAND = "python -m ulvideo.config_docs > docs/configuration.md"


@dataclass(frozen=True)
class FieldDoc:
    section: str  # "" for top-level fields
    name: str
    type: str
    default: str
    description: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text by line, and the lines that hold nothing but a comment."""
    text, alone = {}, set()
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    alone = {line for line in text if line not in code_lines}
    return text, alone


def _type_text(node: ast.expr) -> str:
    """`Literal["a", "b"]` -> `"a", "b"`; `X | None` -> `X or null`; otherwise the annotation."""
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Literal":
        values = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return "one of " + ", ".join(json.dumps(ast.literal_eval(v)) for v in values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{_type_text(node.left)} or {_type_text(node.right)}"
    if isinstance(node, ast.Constant) and node.value is None:
        return "null"
    return ast.unparse(node)


def _default_text(value) -> str:
    if dataclasses.is_dataclass(value):
        return ""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _class_fields(tree: ast.Module) -> dict[str, list[ast.AnnAssign]]:
    return {node.name: [s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
            for node in tree.body if isinstance(node, ast.ClassDef)}


def section_docs() -> dict[str, str]:
    """Section name ("" = top level) -> its dataclass docstring."""
    cfg = Config()
    out = {"": (type(cfg).__doc__ or "").strip()}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = (type(value).__doc__ or "").strip()
    return out


def field_docs() -> list[FieldDoc]:
    """Every leaf field of `Config`, in schema order, with the comment written next to it."""
    source = SOURCE.read_text()
    tree = ast.parse(source)
    comments, alone = _comments(source)
    classes = _class_fields(tree)
    cfg = Config()

    def describe(node: ast.AnnAssign) -> str:
        above, line = [], node.lineno - 1
        while line in alone:
            above.insert(0, comments[line])
            line -= 1
        trailing = comments.get(node.end_lineno) if node.end_lineno not in alone else None
        text = " ".join(above)  # a comment block above is one text, wrapped
        return f"{text}: {trailing}" if text and trailing else text or trailing or ""

    out, missing = [], []
    scopes = [("", cfg)] + [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                            if dataclasses.is_dataclass(getattr(cfg, f.name))]
    for section, obj in scopes:
        nodes = {n.target.id: n for n in classes[type(obj).__name__]}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                continue  # a section, documented by its own table
            node = nodes[f.name]
            doc = FieldDoc(section, f.name, _type_text(node.annotation), _default_text(value), describe(node))
            if not doc.description:
                missing.append(doc.key)
            out.append(doc)
    if missing:
        raise ValueError(f"{SOURCE}: no comment next to {', '.join(missing)} (every field says what it does)")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _typed(d: FieldDoc) -> str:
    """The type with its range (`config_checks.RANGES`): 'int, >= 1', 'list[int] or null, each >= 2'."""
    from ulvideo.config_checks import RANGES, describe

    rule = RANGES.get(d.key)
    if rule is None or rule == "finite":
        return d.type
    return f"{d.type}, {'each ' if d.type.startswith(('list', 'tuple')) else ''}{describe(rule)}"


def markdown() -> str:
    """docs/configuration.md: one table per section (field, type, default, description)."""
    docs, sections = field_docs(), section_docs()
    lines = [
        "# Configuration reference",
        "",
        f"Generated from `ulvideo/config.py` by `{COMMAND}`; edit the comments there, not this file.",
        "",
        "Every default lives in the schema. A YAML config lists only overrides and may start with",
        "`inherit: other.yaml` (a path relative to it); flags such as `--train.lr=2e-4` after the config",
        "override both. Unknown keys and values of the wrong type stop a run before it starts, naming",
        "the key and the file or flag. So does a number out of the range shown after its type (every",
        "float must also be finite; `ulvideo/config_checks.py` states the ranges and the checks across",
        "fields). Each run writes its resolved config to `RUN/config.yaml`.",
        "",
        f"{len(docs)} fields.",
    ]
    for section, about in sections.items():
        rows = [d for d in docs if d.section == section]
        lines += ["", f"## `{section}`" if section else "## Top level", "", about, "",
                  "| field | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{d.key}` | {_cell(_typed(d))} | `{d.default}` | {_cell(d.description)} |" for d in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
