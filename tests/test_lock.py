"""requirements.lock against requirements*.txt: every package the spec names is pinned in the lock,
with hashes, at a version the spec allows; torch, which the Makefile installs first, by its pin."""

import os
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.join(os.path.dirname(__file__), "..")


def read_spec(path):
    """The requirements of a requirements file and the ones it includes with -r, by name."""
    spec = {}
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                spec.update(read_spec(os.path.join(os.path.dirname(path), line[3:].strip())))
            elif line:
                requirement = Requirement(line)
                spec[canonicalize_name(requirement.name)] = requirement
    return spec


def read_lock(path):
    """pip-compile's output: {name: (version, number of hashes)}."""
    with open(path) as f:
        text = re.sub(r"#.*", "", f.read()).replace("\\\n", " ")  # one line per package
    lock = {}
    for line in filter(None, map(str.strip, text.splitlines())):
        name, version = re.match(r"(\S+)==(\S+)", line).groups()
        lock[canonicalize_name(name)] = (Version(version), line.count("--hash=sha256:"))
    return lock


def makefile_torch():
    """The torch version the Makefile installs before the lock (its TORCH ?= torch==X)."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        return Version(re.search(r"^TORCH \?= torch==(\S+)$", f.read(), re.M).group(1))


def problems(spec, lock, torch_version):
    """What the lock gets wrong against the spec, one line each; torch is the Makefile's pin."""
    found = ["torch: in the lock, but the Makefile installs it"] if "torch" in lock else []
    for name, requirement in spec.items():
        version = torch_version if name == "torch" else lock.get(name, (None, 0))[0]
        if version is None:
            found.append(f"{name}: not in the lock")
        elif version not in requirement.specifier:
            found.append(f"{name}: {version} is not {requirement.specifier}")
    return found


def test_the_lock_pins_every_package_of_the_spec_at_a_version_it_allows():
    spec = read_spec(os.path.join(ROOT, "requirements-dev.txt"))
    lock = read_lock(os.path.join(ROOT, "requirements.lock"))
    assert {"torch", "transformers", "peft", "pytest"} <= spec.keys()  # both files, read through -r
    assert problems(spec, lock, makefile_torch()) == [], "run `make lock`"
    assert all(hashes > 0 for _, hashes in lock.values())  # what pip --require-hashes needs


def test_a_lock_that_no_longer_satisfies_the_spec_is_caught(tmp_path):
    (tmp_path / "base.txt").write_text("torch>=2.4\nnumpy>=2  # a comment\nsafetensors>=0.4\n")
    (tmp_path / "dev.txt").write_text("-r base.txt\nPyYAML>=6\n")
    (tmp_path / "requirements.lock").write_text(
        "# via pip-compile\nnumpy==1.26.4 \\\n    --hash=sha256:00 \\\n    --hash=sha256:11\n    # via -r base.txt\n"
        "pyyaml==6.0.2 \\\n    --hash=sha256:22\ntorch==2.13.0 \\\n    --hash=sha256:33\n")
    spec, lock = read_spec(tmp_path / "dev.txt"), read_lock(tmp_path / "requirements.lock")
    assert lock["numpy"] == (Version("1.26.4"), 2) and lock["pyyaml"] == (Version("6.0.2"), 1)
    assert problems(spec, lock, Version("2.13.0")) == ["torch: in the lock, but the Makefile installs it",
                                                       "numpy: 1.26.4 is not >=2", "safetensors: not in the lock"]
    del lock["torch"]
    assert problems(spec, lock, Version("2.3.0"))[0] == "torch: 2.3.0 is not >=2.4"
