#!/usr/bin/env bash
# Every `pip install` line of README.md, resolved against the package registry by
# `pip install --dry-run` (--isolated: the public index as a user's pip sees it, not this
# machine's pip configuration; --ignore-installed: the whole set, as in an empty venv).
# Writes tools/install_lines.txt: per line, what it resolves to (the jax packages and how
# many in all) or why it does not. Exit status 1 if any line does not resolve.
#
#   tools/check_install_lines.sh            # with .venv/bin/python (PYTHON=... for another)
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=tools/install_lines.txt
work=$(mktemp -d)
# The README's line for an image that already has a CUDA jax reads jax-constraints.txt:
# what `pip freeze` gives on such an image (CUDA 12, jax 0.12.0.1).
printf 'jax==0.12.0.1\njaxlib==0.12.0.1\njax-cuda12-plugin==0.12.0.1\njax-cuda12-pjrt==0.12.0.1\n' \
    > jax-constraints.txt
trap 'rm -rf "$work" jax-constraints.txt' EXIT

mapfile -t lines < <("$PYTHON" tools/readme_install_lines.py)

{
    echo "# tools/check_install_lines.sh, $(date -u +%Y-%m-%dT%H:%MZ), $("$PYTHON" -m pip --version | cut -d' ' -f1-2)," \
         "Python $("$PYTHON" -c 'import platform; print(platform.python_version())')," \
         "$(uname -m) Linux: every pip install line of README.md, dry-run against the registry"
} > "$work/out"
failed=0
for line in "${lines[@]}"; do
    read -r -a words <<< "${line#pip install }"
    words=("${words[@]//\"/}")
    if "$PYTHON" -m pip install --isolated --dry-run --ignore-installed --quiet \
            --report "$work/report.json" "${words[@]}" > "$work/log" 2>&1; then
        summary=$("$PYTHON" - "$work/report.json" <<'PY'
import json, sys
packages = {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.load(open(sys.argv[1]))["install"]}
jax = ", ".join(f"{name} {version}" for name, version in sorted(packages.items())
                if name.startswith(("jax", "libtpu")))
print(f"{len(packages)} packages ({jax})")
PY
)
        echo "ok      $line  ->  $summary" >> "$work/out"
    else
        failed=1
        echo "FAILED  $line  ->  $(grep -E '^ERROR' "$work/log" | head -1)" >> "$work/out"
    fi
done
cp "$work/out" "$OUT"
cat "$OUT"
exit $failed
