"""MkDocs hooks for npgpt2's documentation (``hooks:`` in mkdocs.yml).

* The hook-point table is generated at build time from npgpt2's own registry
  (``npgpt2.hooks.HOOK_POINTS``): a page writes ``{{ hook_point_table }}`` where it goes.
* The TransformerLens porting guide, ``from-transformerlens.md``, gets its place in the navigation
  when the file is there (and none while it is not, so the strict build passes either way).
"""

from __future__ import annotations

import os
import sys

PLACEHOLDER = "{{ hook_point_table }}"
PORTING = ("Porting from TransformerLens", "from-transformerlens.md")
PORTING_AFTER = "Hook points"  # its place in the navigation: after this entry


def hook_point_table() -> str:
    """The registry's table: name, short name, shape and meaning of every hook point."""
    from npgpt2.hooks import markdown_table

    return markdown_table()


def nav_with_porting_guide(nav: list, docs_dir: str) -> list:
    """``nav`` with the porting guide after ``PORTING_AFTER`` if its file exists in ``docs_dir``."""
    title, path = PORTING
    present = os.path.isfile(os.path.join(docs_dir, path))
    listed = any(isinstance(e, dict) and path in e.values() for e in nav)
    if not present or listed:
        return nav
    out = []
    for entry in nav:
        out.append(entry)
        if isinstance(entry, dict) and PORTING_AFTER in entry:
            out.append({title: path})
    return out if len(out) > len(nav) else nav + [{title: path}]


def on_config(config, **kwargs):
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))
    if root not in sys.path:  # document (and generate from) this checkout's npgpt2
        sys.path.insert(0, root)
    if config["nav"] is not None:
        config["nav"] = nav_with_porting_guide(config["nav"], config["docs_dir"])
    return config


def on_page_markdown(markdown, page, config, files, **kwargs):
    if PLACEHOLDER in markdown:
        markdown = markdown.replace(PLACEHOLDER, hook_point_table())
    return markdown
