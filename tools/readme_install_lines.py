"""The `pip install ...` lines of README.md (its sh blocks, comments dropped, and its inline
code), once each, in order: what tools/check_install_lines.sh dry-runs and
tests/test_install.py compares with the recorded result."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_install_lines(path: str = README) -> list[str]:
    with open(path) as handle:
        text = handle.read()
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("pip install"):
                found.append(line)
    found += [span for span in re.findall(r"`([^`\n]+)`", text) if span.startswith("pip install")]
    return list(dict.fromkeys(found))


if __name__ == "__main__":
    print("\n".join(readme_install_lines()))
