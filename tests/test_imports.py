"""Importing the library does not import transformers (~2 s on top of torch's), so that a
script with its imports at the top still answers --help quickly; every script has its imports
at its top; and no script imports a training script (issue #25)."""

import ast
import glob
import os
import subprocess
import sys

import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_vae.py", "train_router.py", "sample.py", "pretrain_lm.py", "train_wm.py", "train_agent.py", "bench.py",
           "bench_memory.py", "experiments/compare_wm.py", "experiments/agent_curve.py", "experiments/vae_curve.py"]
LIBRARY = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))
                 if os.path.basename(p) not in SCRIPTS)  # every file at the top that is not a script


def test_the_library_imports_without_transformers():
    """Every library module, imported in a fresh interpreter, leaves transformers unimported."""
    code = (f"import sys\n"
            f"import {', '.join(LIBRARY)}\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout == "[]\n"


def test_import_transformers_turns_its_progress_bars_off():
    """lm imports transformers on first use; its progress bars go off then, as they did at lm's import."""
    transformers = lm.import_transformers()
    transformers.utils.logging.enable_progress_bar()
    assert lm.import_transformers() is transformers
    assert not transformers.utils.logging.is_progress_bar_enabled()


def test_no_file_imports_a_training_script():
    """A model file rebuilds itself from its checkpoint (vae_setup.load_vae, router.load_router) and the world
    model's setup is a library (wm_setup.py), so no file outside tests/, experiments/ included, imports a
    train_* script: none of their lines starts with `import train_` or `from train_`, indented or not
    (issue #25's grep)."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
        with open(path) as f:
            found += [f"{os.path.relpath(path, ROOT)}: {line.strip()}" for line in f
                      if line.lstrip().startswith(("import train_", "from train_"))]
    assert found == []


def test_every_script_has_its_imports_at_its_top_and_answers_help_without_transformers():
    """No import statement after the first definition (no more parsing before importing), and --help
    answers without importing transformers."""
    for script in SCRIPTS:
        with open(os.path.join(ROOT, script)) as f:
            body = ast.parse(f.read()).body
        first_code = next(i for i, node in enumerate(body) if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.If)))
        late = [node.lineno for node in body[first_code:] if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert late == [], f"{script}: imports at lines {late}, after its first definition"
    code = ("import runpy, sys\n"
            f"for script in {SCRIPTS!r}:\n"
            "    sys.argv = [script, '--help']\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n"
            "    assert 'transformers' not in sys.modules, script + ' imported transformers before --help'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    assert done.returncode == 0 and done.stdout.count("show this help message") == len(SCRIPTS), done.stderr[-500:]


def test_no_library_function_takes_the_scripts_flags():
    """Below the scripts, functions take values and config dataclasses: no parameter is named args."""
    for name in LIBRARY:
        with open(os.path.join(ROOT, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if p is not None]
                assert "args" not in names, f"{name}.py:{node.lineno} takes args"
