#!/usr/bin/env python3
"""Shell completions for wisp and wisp-agent, generated from their own --help (argh's layout).

    scripts/completions.py bash BIN...   # a bash completion script for each binary, on stdout
    scripts/completions.py zsh BIN       # a zsh completion function (#compdef) for one binary

For each command and subcommand it reads the usage line (which options take a value: those
written `[--opt <value>]`), the options with their help, and the subcommands with theirs, so
the completions follow the argument definitions without a second list to keep. After an option
that takes a value, bash and zsh offer file names.

Install:  scripts/completions.py bash target/release/wisp target/release/wisp-agent \\
              > /etc/bash_completion.d/wisp
          scripts/completions.py zsh target/release/wisp > "${fpath[1]}/_wisp"
"""
import os
import re
import subprocess
import sys


def help_text(binary, path):
    out = subprocess.run([binary, *path, "--help"], capture_output=True, text=True, check=False)
    if not out.stdout.startswith("Usage:"):
        sys.exit(f"completions: `{binary} {' '.join(path)} --help` did not print argh's usage: "
                 f"{(out.stdout + out.stderr).strip()[:200]}")
    return out.stdout


def sections(text):
    """The usage line and the entries of each `Name:` section, as (name, description) pairs."""
    usage, current, result = "", None, {}
    for line in text.splitlines():
        if line.startswith("Usage:"):
            usage = line
        elif re.match(r"^[A-Z][A-Za-z ]*:$", line):
            current = line[:-1]
            result[current] = []
        elif current and line.startswith("  "):
            m = re.match(r"^  (\S.*?)(?:\s{2,}(.*))?$", line)
            if m and not line.startswith("    "):
                result[current].append([m.group(1), m.group(2) or ""])
            elif result[current]:  # a description wrapped onto its own line(s)
                entry = result[current][-1]
                entry[1] = (entry[1] + " " + line.strip()).strip()
        elif not line.strip():
            current = None
    return usage, result


def command(binary, path=()):
    """A command's options (name, takes a value, help) and its subcommands, recursively."""
    usage, sec = sections(help_text(binary, list(path)))
    valued = set(re.findall(r"\[(-{1,2}[\w-]+) <[\w-]+>\]", usage))
    options = []
    for names, desc in sec.get("Options", []):
        for name in [n.strip() for n in names.split(",")]:
            if name.startswith("-"):
                options.append((name, name in valued, desc))
    subs = [(name, desc, command(binary, (*path, name))) for name, desc in sec.get("Commands", [])]
    return {"options": options, "subs": subs}


def ident(*words):
    """A shell function name for a binary and a command path: `_wisp_node_add`."""
    return "".join("_" + re.sub(r"\W", "_", w) for w in words)


def bash(binary, tree):
    name = os.path.basename(binary)
    fn = ident(name)
    lines = [
        f"# bash completion for {name}, made by scripts/completions.py from `{name} --help`.",
        f"{fn}() {{",
        '    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} path="" i w',
        "    # The (sub)command path so far: the words before the cursor that are not options.",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        "        w=${COMP_WORDS[i]}",
        "        case $w in -*) continue ;; esac",
        '        case "$path/$w" in',
    ]
    known = []

    def walk(node, p):
        for sub, _, child in node["subs"]:
            known.append(f"{p}/{sub}")
            walk(child, f"{p}/{sub}")

    walk(tree, "")
    if known:
        lines.append("            " + " | ".join(known) + ') path="$path/$w" ;;')
    lines += ["        esac", "    done", '    case "$path" in']

    def emit(node, p):
        valued = " ".join(o for o, v, _ in node["options"] if v)
        opts = " ".join(o for o, _, _ in node["options"])
        subs = " ".join(s for s, _, _ in node["subs"])
        lines.append(f'        "{p}")')
        if valued:
            lines.append(f'            case $prev in {valued.replace(" ", " | ")}) COMPREPLY=($(compgen -f -- "$cur")); return ;; esac')
        lines.append(f'            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "{opts}" -- "$cur"))')
        if subs:
            lines.append(f'            else COMPREPLY=($(compgen -W "{subs}" -- "$cur"))')
        else:
            lines.append('            else COMPREPLY=($(compgen -f -- "$cur"))')
        lines.append("            fi ;;")
        for sub, _, child in node["subs"]:
            emit(child, f"{p}/{sub}")

    emit(tree, "")
    lines += ["    esac", "}", f"complete -o filenames -F {fn} {name}", ""]
    return "\n".join(lines)


def zsh_quote(s):
    return s.replace("\\", "\\\\").replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")


def zsh(binary, tree):
    name = os.path.basename(binary)
    lines = [f"#compdef {name}", f"# zsh completion for {name}, made by scripts/completions.py from `{name} --help`."]

    def emit(node, p, depth):
        f = ident(name, *p)
        lines.append(f"{f}() {{")
        specs = []
        for o, v, d in node["options"]:
            spec = f"'{o}[{zsh_quote(d)}]" + (":value:_files'" if v else "'")
            specs.append(spec)
        if node["subs"]:
            lines.append("    local -a cmds")
            lines.append("    cmds=(" + " ".join(f"'{s}:{zsh_quote(d)}'" for s, d, _ in node["subs"]) + ")")
            lines.append(f"    if (( CURRENT == {depth + 2} )); then")
            lines.append("        [[ $words[CURRENT] == -* ]] && { _arguments " + " ".join(specs) + "; return; }")
            lines.append("        _describe command cmds; return")
            lines.append("    fi")
            lines.append(f"    case $words[{depth + 2}] in")
            for s, _, _ in node["subs"]:
                lines.append(f"        {s}) {ident(name, *p, s)} ;;")
            lines.append("    esac")
        else:
            lines.append("    _arguments " + " ".join(specs) + " '*:argument:_files'")
        lines.append("}")
        for s, _, child in node["subs"]:
            emit(child, (*p, s), depth + 1)

    emit(tree, (), 0)
    lines += [f'{ident(name)} "$@"', ""]
    return "\n".join(lines)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("bash", "zsh") or (sys.argv[1] == "zsh" and len(sys.argv) != 3):
        sys.exit(__doc__.strip().split("\n\n")[1])
    shell, binaries = sys.argv[1], sys.argv[2:]
    for b in binaries:
        tree = command(b)
        sys.stdout.write(bash(b, tree) if shell == "bash" else zsh(b, tree))


if __name__ == "__main__":
    main()
