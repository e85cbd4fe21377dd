"""The core imports without the optional frameworks, and the adapters are installed in the package namespace."""

import subprocess
import sys


def test_core_imports_without_transformers_or_accelerate():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "sys.modules['accelerate'] = None\n"
        "import contrasim_monitor, contrasim_monitor.measures, contrasim_monitor.contrasim\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_integrations_live_in_package_namespace():
    import contrasim_monitor.integrations.transformers as adapter

    assert adapter.__name__ == "contrasim_monitor.integrations.transformers"
    assert hasattr(adapter, "ContraSimCallback")
