"""Every config field is read somewhere in ulvideo/ outside config.py (one knob per real user choice),
and docs/configuration.md is the reference generated from the schema's comments."""
import ast
import dataclasses
from pathlib import Path

import pytest

from ulvideo import config_docs
from ulvideo.config import Config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ulvideo"
SCHEMA_FILES = {PACKAGE / "config.py", PACKAGE / "config_checks.py", PACKAGE / "config_docs.py"}
SECTION_CLASSES = {type(getattr(Config(), f.name)).__name__: f.name for f in dataclasses.fields(Config)
                   if dataclasses.is_dataclass(getattr(Config(), f.name))}
SECTIONS = set(SECTION_CLASSES.values())
ANY = None  # a read through an object whose section is not known (e.g. `cfg.size` in a network)

# fields that are read nowhere in the package, each with the reason it stays. Empty: keep it so.
UNREAD_BY_DESIGN: dict[str, str] = {}


# ---- the scan ---------------------------------------------------------------------------------


def _name(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        return expr.attr
    return None


class _Reads:
    """Config reads in one module. A config object is a name or attribute called `cfg`/`config`/
    `*_cfg`, a name assigned from one, or a parameter annotated with a config class; `X.section` of
    a config object is that section, and `<section>_cfg` names one too. A read is an attribute of a
    config object, `getattr(config object, "field")`, or a string key of a dict literal passed
    together with a config object (a table of field names such as nets/sizes.py's overrides)."""

    def __init__(self, tree: ast.Module):
        self.alias: dict[str, set] = {}  # name -> sections it may hold (ANY: a whole config)
        for node in ast.walk(tree):
            for arg in getattr(getattr(node, "args", None), "args", []) + getattr(getattr(node, "args", None), "kwonlyargs", []):
                ann = ast.unparse(arg.annotation) if getattr(arg, "annotation", None) else ""
                if ann in SECTION_CLASSES:
                    self.alias.setdefault(arg.arg, set()).add(SECTION_CLASSES[ann])
                elif ann == "Config":
                    self.alias.setdefault(arg.arg, set()).add(ANY)
        pairs = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs += [(t, v) for t, v in zip(target.elts, node.value.elts)]
                    else:
                        pairs.append((target, node.value))
        changed = True
        while changed:  # aliases of aliases
            changed = False
            for target, value in pairs:
                if isinstance(target, ast.Name):
                    found = self.sections(value) - self.alias.get(target.id, set())
                    if found:
                        self.alias.setdefault(target.id, set()).update(found)
                        changed = True
        self.reads: set[tuple] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                self._add(self.sections(node.value), node.attr)
            elif isinstance(node, ast.Call):
                args = list(node.args) + [k.value for k in node.keywords]
                if _name(node.func) == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                    self._add(self.sections(node.args[0]), node.args[1].value)
                owners = set().union(*(self.sections(a) for a in args)) if args else set()
                for a in args:
                    if isinstance(a, ast.Dict) and owners:
                        for k in a.keys:
                            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                                self._add(owners, k.value)

    def _add(self, sections: set, field: str) -> None:
        self.reads.update((s, field) for s in sections)

    def sections(self, expr: ast.expr) -> set:
        name = _name(expr)
        if name is None:
            return set()
        if isinstance(expr, ast.Attribute) and name in SECTIONS and self.sections(expr.value):
            return {name}
        if isinstance(expr, ast.Name) and name in self.alias:
            return set(self.alias[name])
        if name.endswith("_cfg") and name[:-4] in SECTIONS:
            return {name[:-4]}
        if name in ("cfg", "config") or name.endswith("_cfg"):
            return {ANY}
        return set()


def config_reads(sources: dict[str, str]) -> set[tuple]:
    out = set()
    for text in sources.values():
        out |= _Reads(ast.parse(text)).reads
    return out


def schema_fields() -> list[tuple[str, str]]:
    """(section, field) of every leaf field; section "" for top-level fields."""
    cfg, out = Config(), []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += [(f.name, g.name) for g in dataclasses.fields(value)]
        else:
            out.append(("", f.name))
    return out


def unread(sources: dict[str, str]) -> list[str]:
    reads = config_reads(sources)
    return [f"{s}.{f}" if s else f for s, f in schema_fields()
            if (s, f) not in reads and (ANY, f) not in reads and (f"{s}.{f}" if s else f) not in UNREAD_BY_DESIGN]


# ---- tests ------------------------------------------------------------------------------------


def test_the_scan_finds_reads_through_aliases_getattr_and_tables_and_misses_unread_fields():
    src = '''
def f(cfg: Config, data_cfg, e: EvalConfig):
    t = cfg.train
    u, d = cfg.ul, data_cfg
    x = torch.zeros(3).size(0), model.decoder.width, args.steps
    table = resolve(size, cfg.decoder, {"depth": "depth"})
    return t.lr, u.loss_factor, d.hflip, getattr(cfg.prior, "attention", "full"), e.every, cfg.stage
'''
    reads = config_reads({"m.py": src})
    for key in [("train", "lr"), ("ul", "loss_factor"), ("data", "hflip"), ("prior", "attention"),
                ("eval", "every"), ("decoder", "depth"), (ANY, "stage")]:
        assert key in reads, key
    # a tensor's .size(), a network's .width and a CLI argument are not config reads
    assert not {("encoder", "size"), (ANY, "size"), ("decoder", "width"), (ANY, "width"), (ANY, "steps"),
                ("train", "steps")} & reads
    missing = unread({"m.py": src})
    assert "train.steps" in missing and "decoder.width" in missing and "train.lr" not in missing


def test_every_config_field_is_read_outside_config_py():
    sources = {str(p): p.read_text() for p in sorted(PACKAGE.rglob("*.py")) if p not in SCHEMA_FILES}
    assert len(sources) > 20
    missing = unread(sources)
    assert not missing, (f"config fields read nowhere in ulvideo/ outside config.py: {', '.join(missing)}. "
                         "Wire them, delete them, or list them in UNREAD_BY_DESIGN with the reason")
    for key, reason in UNREAD_BY_DESIGN.items():
        assert len(reason) > 20, f"{key}: give the reason it stays"


def test_every_field_has_a_description_and_the_reference_is_current():
    docs = config_docs.field_docs()
    assert [(d.section, d.name) for d in docs] == schema_fields()
    assert all(len(d.description) > 5 for d in docs)
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == config_docs.markdown(), (
        f"docs/configuration.md is out of date: run `{config_docs.COMMAND}`")


def test_a_field_without_a_comment_is_refused(tmp_path, monkeypatch):
    lines = config_docs.SOURCE.read_text().splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if line.startswith("    keep_last: int = 3  #"))
    lines[i] = "    keep_last: int = 3\n"
    (tmp_path / "config.py").write_text("".join(lines))
    monkeypatch.setattr(config_docs, "SOURCE", tmp_path / "config.py")
    with pytest.raises(ValueError, match="train.keep_last"):
        config_docs.field_docs()
