"""The sbatch scripts' headers point at documentation that exists."""

from __future__ import annotations

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_file_and_readme_section_an_sbatch_header_names_exists():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    sections = {line.lstrip("#").strip() for line in readme.splitlines() if line.startswith("#")}
    named = 0
    for script in glob.glob(os.path.join(REPO, "slurm", "*.sbatch")):
        header = "".join(line for line in open(script) if line.startswith("#"))
        for path in re.findall(r"\b((?:docs|slurm|launch)/[\w./-]+\.(?:md|sh|py))", header):
            assert os.path.exists(os.path.join(REPO, path)), (script, path)
            named += 1
        for section in re.findall(r'README\.md, "([^"]+)"', header):
            assert section in sections, (script, section)
            named += 1
    assert named >= 6
