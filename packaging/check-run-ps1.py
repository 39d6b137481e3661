"""run.ps1 cannot be run on these machines: check it by parsing instead.

Parses run.ps1 with the tree-sitter PowerShell grammar and fails, naming line and
column, on any syntax error. (Its verbs are compared with run.sh's by the Rust test
cli::run_sh_and_run_ps1_have_the_same_verbs.) Needs the PyPI packages tree-sitter and
tree-sitter-powershell; packaging/check-run-ps1.sh installs them when missing.
"""
import sys

import tree_sitter
import tree_sitter_powershell


def syntax_errors(source: bytes):
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    found = []
    stack = [parser.parse(source).root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            found.append(node)
        stack.extend(node.children)
    return sorted(found, key=lambda n: n.start_point)


def main(path: str) -> int:
    source = open(path, "rb").read()
    lines = source.splitlines()
    errors = syntax_errors(source)
    for e in errors[:20]:
        row, col = e.start_point
        what = f"missing {e.type}" if e.is_missing else "syntax error"
        text = lines[row].decode(errors="replace").strip()[:100] if row < len(lines) else ""
        print(f"{path}:{row + 1}:{col + 1}: {what}: {text}")
    print(f"{path}: {len(errors)} syntax error(s) (tree-sitter-powershell)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "run.ps1"))
