"""A griffe extension that adapts the library's docstring habits to the Google-style renderer.

- ``Example:`` (and ``Example (what it shows):``) opens an examples section, like ``Examples:``
  (griffe only knows the plural and renders the singular as an admonition whose ``>>>`` lines
  become nested quotes and whose ``# comments`` become headings).
- Display equations written as an indented run right under a prose line (no blank line
  between, which markdown folds into the paragraph) become ``text`` blocks.
- An ``Args:`` item that documents a second parameter in its own text (``params: the
  inner optimum. hparams: pytree of ...``) is split in two, so that parameter gets its row
  in the rendered table (only names of the signature that have no item of their own).
- Sphinx roles (``:func:`make_hvp```, ``:class:`SolveResult```) become cross-references to
  the object's canonical path, looked up from the module whose docstring holds them, then from
  the top-level package; a name found nowhere stays plain code.
The docstrings themselves are not changed; only what the docs site renders.
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example(?:\s*\((?P<what>[^)]*)\))?:[ \t]*$", re.M)
_SECTION_OR_ITEM = re.compile(r"^(?:[\w][\s\w-]*:\s*$|\w+:\s|\w+ \([^)]*\):)")
_ARGS = re.compile(r"^Args:[ \t]*\n(?P<body>(?:(?:[ \t]+.*)?\n)*?)(?=\S|\Z)", re.M)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`~?(?P<name>[\w.]+)`")


def _display_blocks(text: str) -> str:
    """Fence indented runs that directly follow a top-level prose line."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        prose = line.strip() and not line.startswith((" ", "\t"))
        if not prose or _SECTION_OR_ITEM.match(line):
            continue
        run = []
        while (i < len(lines) and lines[i].startswith("    ")
               and not lines[i].lstrip().startswith(">>>")):
            run.append(lines[i][4:])
            i += 1
        if run:
            out += ["", "```text", *run, "```", ""]
    return "\n".join(out)


def _split_args(text: str, params: list[str]) -> str:
    """Give each signature parameter named inside another Args item (``. name: ``) its own."""
    m = _ARGS.search(text + "\n")
    if m is None:
        return text
    body = m.group("body")
    own = set(re.findall(r"^ {4}(\w+)\s*(?:\([^)]*\))?:", body, re.M))
    for name in params:
        if name not in own:
            body = re.sub(rf"(?<=\.) ({name}): ", r"\n    \1: ", body, count=1)
    return text[: m.start("body")] + body + text[m.end("body") :]


def _signature(obj: griffe.Object) -> list[str]:
    if obj.is_function:
        return [p.name for p in obj.parameters]
    init = obj.members.get("__init__") if obj.is_class else None
    return [p.name for p in init.parameters] if init is not None and init.is_function else []


class DocstringAdapter(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        doc = obj.docstring
        if doc is None:
            return

        def example(m: re.Match) -> str:
            head = f"{m.group('indent')}Examples:"
            what = m.group("what")
            return head + (f"\n{m.group('indent')}    {what[0].upper()}{what[1:]}:" if what else "")

        text = _split_args(doc.value, _signature(obj))
        doc.value = _display_blocks(_EXAMPLE.sub(example, text))

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        """Roles are resolved once the whole package is loaded (aliases need their targets)."""
        collection = pkg.modules_collection

        def lookup(path: str) -> str | None:
            try:
                obj = collection.get_member(path)
                return obj.final_target.path if obj.is_alias else obj.path
            except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None

        def visit(obj: griffe.Object) -> None:
            if obj.docstring is not None:
                module = obj.path if obj.is_module else obj.module.path

                def role(m: re.Match) -> str:
                    name = m.group("name")
                    tries = [name] if name.startswith(pkg.name) else [
                        f"{module}.{name}", f"{pkg.name}.{name}"]
                    for path in tries:
                        target = lookup(path)
                        if target:
                            return f"[`{name.split('.')[-1]}`][{target}]"
                    return f"`{name}`"

                obj.docstring.value = _ROLE.sub(role, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
