"""Our import packages are top-level folders named `kernels` and `data`, which PyPI
also has (Hugging Face's kernel hub, which transformers probes). They must resolve
to this repo, and transformers must still import and build a model beside them.
`kernels` exports its submodules as modules, never a function under a module's name."""
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_packages_resolve_inside_repo_and_transformers_works():
    code = (
        "import kernels, data, trainer, cluster, vlpt\n"
        "import transformers\n"
        "from transformers import BertConfig, BertModel\n"
        "import torch\n"
        "m = BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, intermediate_size=64))\n"
        "out = m(torch.tensor([[1, 2, 3]])).last_hidden_state\n"
        "assert out.shape == (1, 3, 32)\n"
        "from transformers.utils import is_kernels_available\n"
        "print(kernels.__file__); print(data.__file__); print(is_kernels_available())\n"
    )
    # A fresh interpreter started elsewhere, as a user's script would be.
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    kernels_file, data_file, hub = out.stdout.split()[-3:]
    assert Path(kernels_file).resolve().is_relative_to(REPO), kernels_file
    assert Path(data_file).resolve().is_relative_to(REPO), data_file
    # transformers must not mistake our `kernels` for the kernel hub.
    assert hub == "False"


def test_packages_resolve_inside_repo_in_this_process():
    import data
    import kernels
    assert Path(kernels.__file__).resolve().is_relative_to(REPO)
    assert Path(data.__file__).resolve().is_relative_to(REPO)
    from kernels.masked_gather import masked_gather  # ours, not the hub's
    assert callable(masked_gather)


KERNEL_MODULES = sorted(m.name for m in pkgutil.iter_modules([str(REPO / "kernels")]))


def test_kernels_submodules_are_listed():
    assert {"dispatch", "ipot", "masked_gather", "ot", "sinkhorn"} <= set(KERNEL_MODULES)


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_kernels_submodule_is_a_module(name):
    """`import kernels.<name>` then `kernels.<name>` is the module, not a function the package
    re-exports under the module's name (which would shadow it)."""
    namespace: dict = {}
    exec(f"import kernels.{name}", namespace)
    attr = getattr(namespace["kernels"], name)
    assert inspect.ismodule(attr), f"kernels.{name} is {attr!r}, not the module"
    assert attr is importlib.import_module(f"kernels.{name}") is sys.modules[f"kernels.{name}"]
    exec(f"from kernels import {name} as by_from", namespace)
    assert namespace["by_from"] is attr


def test_kernels_package_exports_no_functions():
    import kernels
    public = {k: v for k, v in vars(kernels).items() if not k.startswith("_")}
    assert all(inspect.ismodule(v) for v in public.values()), \
        {k: v for k, v in public.items() if not inspect.ismodule(v)}
    assert all(inspect.ismodule(getattr(kernels, name)) for name in kernels.__all__)
