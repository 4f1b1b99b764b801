"""Shell completion for exportctl, generated from its argument parser with
shtab (bash and zsh): commands, options and choices, plus node names,
export ids and job ids asked from the running daemon (`exportctl --json
nodes` / `list` / `jobs`; nothing is offered when no daemon answers).

    python -m exportctl.completion bash > /usr/share/bash-completion/completions/exportctl
"""

from __future__ import annotations

import argparse
import sys

from exportctl.cli import build_parser

# shell function -> the exportctl command and the JSON member it lists
LOOKUPS = {
    "_exportctl_nodes": ("nodes", "[n['node-name'] for n in d]"),
    "_exportctl_exports": ("list", "[e['id'] for e in d]"),
    "_exportctl_jobs": ("jobs", "[j['id'] for j in d['jobs']]"),
}

# (command, argument dest) -> the lookup that completes it
DYNAMIC = {
    **{(cmd, "node"): "_exportctl_nodes" for cmd in (
        "add", "blockdev-del", "resize", "snapshot", "stream", "commit", "mirror", "bitmap")},
    ("mirror", "target"): "_exportctl_nodes",
    ("del", "id"): "_exportctl_exports",
    ("job", "id"): "_exportctl_jobs",
}


def _bash_function(name: str, command: str, expr: str) -> str:
    return (f'{name}() {{\n'
            f'  local names\n'
            f'  names=$(exportctl --json {command} 2>/dev/null | python3 -c '
            f'"import json, sys; d = json.load(sys.stdin); print(\' \'.join({expr}))" 2>/dev/null)\n'
            f'  compgen -W "$names" -- "$1"\n'
            f'}}\n')


def _zsh_function(name: str, command: str, expr: str) -> str:
    return (f'{name}() {{\n'
            f'  local -a names\n'
            f'  names=(${{(f)"$(exportctl --json {command} 2>/dev/null | python3 -c '
            f'"import json, sys; d = json.load(sys.stdin); print(\'\\\\n\'.join({expr}))" 2>/dev/null)"}})\n'
            f'  compadd -a names\n'
            f'}}\n')


def parser_with_completions() -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for cmd, sub in action.choices.items():
                for arg in sub._actions:
                    fn = DYNAMIC.get((cmd, arg.dest))
                    if fn is not None:
                        arg.complete = {"bash": fn, "zsh": fn}  # type: ignore[attr-defined]
    return parser


def script(shell: str) -> str:
    import shtab

    make = _bash_function if shell == "bash" else _zsh_function
    preamble = "".join(make(name, cmd, expr) for name, (cmd, expr) in LOOKUPS.items())
    return shtab.complete(parser_with_completions(), shell, preamble={shell: preamble})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ("bash", "zsh"):
        print("usage: python -m exportctl.completion bash|zsh", file=sys.stderr)
        return 2
    sys.stdout.write(script(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
