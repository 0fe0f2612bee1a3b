"""The vhost_min package itself: lazy top-level names, a cheap ``import vhost_min``, stdlib only."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
import unittest

import vhost_min

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "vhost_min")


def loaded_after(statement: str) -> list[str]:
    """The vhost_min modules a fresh interpreter has loaded after running ``statement``."""
    code = f"{statement}; import sys; print(*sorted(m for m in sys.modules if m.split('.')[0] == 'vhost_min'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=True)
    return result.stdout.split()


class LazyNamesTest(unittest.TestCase):
    def test_every_lazy_name_is_the_submodules_object(self) -> None:
        for name, module in vhost_min._LAZY.items():
            with self.subTest(name=name):
                self.assertIn(name, vhost_min.__all__)
                self.assertIs(getattr(vhost_min, name), getattr(importlib.import_module(f"vhost_min.{module}"), name))
                self.assertIn(name, dir(vhost_min))

    def test_the_documented_entry_points_are_there(self) -> None:
        from vhost_min import (Backend, BlkClient, BlkDevice, Connection, Device, Frontend, Listener, Server,
                               serve)
        self.assertEqual(Device.__module__, "vhost_min.device")
        self.assertEqual([Backend.__module__, Server.__module__, serve.__module__], ["vhost_min.backend"] * 3)
        self.assertEqual(Frontend.__module__, "vhost_min.frontend")
        self.assertEqual([BlkDevice.__module__, BlkClient.__module__], ["vhost_min.blk"] * 2)
        self.assertEqual([Connection.__module__, Listener.__module__], ["vhost_min.user"] * 2)

    def test_unknown_name_is_an_attribute_error(self) -> None:
        with self.assertRaisesRegex(AttributeError, "no attribute 'Nonesuch'"):
            getattr(vhost_min, "Nonesuch")
        with self.assertRaises(ImportError):
            exec("from vhost_min import Nonesuch", {})


class ImportCostTest(unittest.TestCase):
    def test_import_vhost_min_loads_only_the_errors(self) -> None:
        self.assertEqual(loaded_after("import vhost_min"), ["vhost_min", "vhost_min.errors"])

    def test_a_lazy_name_loads_its_module_and_what_that_needs(self) -> None:
        loaded = loaded_after("from vhost_min import Connection")
        self.assertIn("vhost_min.user", loaded)
        self.assertNotIn("vhost_min.backend", loaded)
        self.assertNotIn("vhost_min.frontend", loaded)
        self.assertIn("vhost_min.backend", loaded_after("from vhost_min import Device, serve"))

    def test_a_client_or_a_device_does_not_load_the_vhost_user_back_end(self) -> None:
        """BlkClient users and VDUSE devices share blk.py with the vhost-user device; neither
        needs the back-end framework (backend.py) or the front-end loaded."""
        loaded = loaded_after("from vhost_min.blk import BlkClient, BlkDevice, BlockImage")
        self.assertIn("vhost_min.device", loaded)
        self.assertNotIn("vhost_min.backend", loaded)
        self.assertNotIn("vhost_min.frontend", loaded)


class StdlibOnlyTest(unittest.TestCase):
    def test_every_absolute_import_is_standard_library(self) -> None:
        sources = sorted(name for name in os.listdir(PACKAGE) if name.endswith(".py"))
        self.assertIn("user.py", sources)
        checked = 0
        for source in sources:
            with open(os.path.join(PACKAGE, source)) as f:
                tree = ast.parse(f.read(), source)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    with self.subTest(file=source, line=node.lineno, module=name):
                        self.assertIn(name.split(".")[0], sys.stdlib_module_names)
                    checked += 1
        self.assertGreater(checked, 50)


if __name__ == "__main__":
    unittest.main()


class TestRunnerUsageTest(unittest.TestCase):
    """``python3 -m tests --help`` is a usage text, not a test named "--help"."""

    def test_help_names_the_tiers_and_every_environment_variable_the_tests_read(self) -> None:
        result = subprocess.run([sys.executable, "-m", "tests", "--help"], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertTrue(result.stdout.startswith("usage: python3 -m tests"), result.stdout)
        for tier in ("unit", "peers", "kernel"):
            self.assertRegex(result.stdout, rf"\n  {tier} ")
        read = set()
        for directory in ("tests", "bench", "vhost_min"):
            for dirpath, _dirs, files in os.walk(os.path.join(ROOT, directory)):
                for name in files:
                    if name.endswith(".py"):
                        with open(os.path.join(dirpath, name)) as f:
                            read |= set(re.findall(r"environ\.get\(\"(CI|VHOST_MIN_\w+)\"", f.read()))
        self.assertIn("VHOST_MIN_SEED", read)
        for variable in read:
            self.assertIn(f"  {variable}=", result.stdout)

    def test_an_unknown_option_is_refused(self) -> None:
        result = subprocess.run([sys.executable, "-m", "tests", "--no-such-option"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 2)
        self.assertIn("unknown option --no-such-option", result.stderr)
